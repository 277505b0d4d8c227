"""The app's behaviour, driven through Textual's pilot against the fake engine: open, read with
progress, stop and resume reading, ask, stop an answer, regenerate, copy, save and restore an archive,
rename and delete sessions, settings, errors, and the command palette."""

from __future__ import annotations

import zipfile

from driving import drive, wait_for, wait_for_answer, wait_for_screen, wait_in_thread
from fake_engine import ANSWER, FakeAssistant, make_folder
from textual.widgets import DataTable, Input, Label, ProgressBar, Static

from kimi_desk.app.messages import AnswerText
from kimi_desk.app.widgets import TurnView
from kimi_desk.engine.ingest import LimitNotice
from kimi_desk.engine.session import SessionStore

QUESTION = "what does helper_2 return?"


def turns(session) -> list:
    """The turns of the session's most recent thread (the chat shows it)."""
    thread = session.latest_thread()
    return thread.turns if thread else []


def text_of(screen, selector) -> str:
    return str(screen.query_one(selector).render())


async def ask(pilot, question=QUESTION, type_it=False):
    """Ask through the question box; typing key by key is slow in the pilot, so only one test does it."""
    field = pilot.app.screen.query_one("#question", Input)
    await pilot.click("#question")
    if type_it:
        await pilot.press(*question)
    else:
        field.value = question
    await pilot.press("enter")


async def chat_with_an_answer(pilot):
    """The chat screen, once it shows, with QUESTION asked and answered there."""
    chat = await wait_for_screen(pilot, "ChatScreen")
    await ask(pilot)
    await wait_for_answer(pilot)
    return chat


def test_open_reads_with_progress_then_chats(home, make_app, fake):
    folder = make_folder(home / "repo")
    fake.hold_at = 160

    async def scenario(pilot):
        screen = await wait_for_screen(pilot, "ReadingScreen")
        await wait_in_thread(fake.holding)
        await wait_for(
            pilot,
            lambda: screen.query_one("#tokens-bar", ProgressBar).progress == 160,
            what="progress at the hold point",
        )
        assert "estimated under a minute on this device (about 1,500 tokens/s)" in text_of(screen, "#reading-estimate")
        assert "160 / 426" in text_of(screen, "#tokens-count")
        assert "1,234 tokens/s" in text_of(screen, "#reading-rate") and "left" in text_of(screen, "#reading-rate")
        fake.release.set()
        chat = await wait_for_screen(pilot, "ChatScreen")
        assert "426 / 8,192 tokens" in text_of(chat, "#gauge-tokens")
        assert "KDA state 4.0 MiB" in text_of(chat, "#gauge-state")
        assert "read 426 tokens" in text_of(chat, "#chat-note")
        assert not chat.query_one("#chat-left-out").display
        assert "model fake-model · cpu" in text_of(chat, "#status-line")

    drive(make_app(folder), scenario)


def test_files_a_limit_left_out_are_shown_with_the_chat(home, make_app):
    folder = make_folder(home / "repo")
    notices = (
        LimitNotice("max_files", 10_000, 1_204, "1,204 files not read: the limit of 10,000 files was reached"),
        LimitNotice("max_file_bytes", 2 << 20, 1, "1 file not read: larger than the limit of 2.0 MiB per file"),
    )

    async def scenario(pilot):
        chat = await wait_for_screen(pilot, "ChatScreen")
        assert chat.query_one("#chat-left-out").display
        assert text_of(chat, "#chat-left-out") == (
            "1,204 files not read: the limit of 10,000 files was reached\n"
            "1 file not read: larger than the limit of 2.0 MiB per file"
        )

    drive(make_app(folder, engine=FakeAssistant(limit_notices=notices)), scenario)


def test_ask_streams_the_answer_in_batches_and_saves_the_turn(home, make_app, fake):
    folder = make_folder(home / "repo")
    fake.token_sleep = 0.02  # about a second of answer: several batches
    batches = []

    async def scenario(pilot):
        chat = await wait_for_screen(pilot, "ChatScreen")
        await ask(pilot, type_it=True)
        await wait_for_answer(pilot)
        turn = chat.query_one(TurnView)
        assert turn.question == QUESTION
        assert turn.markdown.source == turn.answer_text == ANSWER + f"\nYou asked: {QUESTION}"
        assert "tokens · " in str(turn.query_one(".meta").render())
        assert chat.query_one("#question", Input).value == ""

    def count_batches(message):
        if isinstance(message, AnswerText):
            batches.append(message.text)

    drive(make_app(folder), scenario, message_hook=count_batches)
    pieces = len(ANSWER.split()) + 4
    # Coalesced: far fewer UI updates than tokens, and they add up to the answer (the rest comes with the finish).
    assert 2 <= len(batches) < pieces / 2, len(batches)
    session = SessionStore().list()[0]
    assert turns(session)[-1].question == QUESTION and turns(session)[-1].finish_reason == "stop"


def test_escape_stops_the_answer_within_a_token(home, make_app, fake):
    folder = make_folder(home / "repo")
    fake.answer_hold_after = 5

    async def scenario(pilot):
        chat = await wait_for_screen(pilot, "ChatScreen")
        await ask(pilot)
        await wait_in_thread(fake.answering)
        await pilot.press("escape")
        fake.answer_release.set()
        await wait_for_answer(pilot)
        turn = chat.query_one(TurnView)
        assert "stopped" in str(turn.query_one(".meta").render())
        assert turns(chat.session)[-1].finish_reason == "cancelled"
        # Five pieces were written before the stop and none after it.
        assert len(turns(chat.session)[-1].answer_token_ids) == 5
        assert turn.answer_text == turns(chat.session)[-1].answer

    drive(make_app(folder), scenario)


def test_regenerate_replaces_the_last_answer_and_copy_takes_it(home, make_app, fake):
    folder = make_folder(home / "repo")

    async def scenario(pilot):
        chat = await chat_with_an_answer(pilot)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: len(fake.asked) == 2, what="the second ask")
        await wait_for_answer(pilot)
        assert fake.asked == [QUESTION, QUESTION]
        assert len(chat.query(TurnView)) == 1 and len(turns(chat.session)) == 1
        await pilot.press("ctrl+y")
        assert pilot.app.clipboard == turns(chat.session)[-1].answer != ""

    drive(make_app(folder), scenario)
    assert len(turns(SessionStore().list()[0])) == 1


def test_save_as_archive_and_restore_it_elsewhere(home, make_app, fake, monkeypatch):
    folder = make_folder(home / "repo")
    archive = home / "saved.zip"

    async def save(pilot):
        await wait_for_screen(pilot, "ChatScreen")
        await ask(pilot)
        await wait_for_answer(pilot)
        await pilot.press("ctrl+s")
        prompt = await wait_for_screen(pilot, "TextPrompt")
        assert prompt.query_one(Input).value.startswith("~/repo-") and prompt.query_one(Input).value.endswith(".zip")
        prompt.query_one(Input).value = str(archive)
        await pilot.press("enter")
        await wait_for(pilot, archive.exists, what="the archive")

    drive(make_app(folder), save)
    assert "session.json" in zipfile.ZipFile(archive).namelist()

    # Another computer: a fresh home with no sessions, and the source folder gone.
    monkeypatch.setenv("KIMI_DESK_HOME", str(home / "elsewhere"))
    (folder / "file_0.py").unlink()

    async def restore(pilot):
        chat = await wait_for_screen(pilot, "ChatScreen")
        assert text_of(chat, "#chat-note") == "restored 'repo' from saved.zip; resumed: 0 tokens to read"
        assert [t.question for t in chat.query(TurnView)] == [QUESTION]

    drive(make_app(archive, engine=FakeAssistant()), restore)
    assert len(SessionStore().list()) == 1


def test_opening_again_resumes_at_once_and_a_session_id_restores(home, make_app, fake):
    folder = make_folder(home / "repo")

    async def first(pilot):
        await wait_for_screen(pilot, "ChatScreen")

    drive(make_app(folder), first)

    async def again(pilot):
        chat = await wait_for_screen(pilot, "ChatScreen")
        assert text_of(chat, "#chat-note") == "resumed: 0 tokens to read"

    drive(make_app(folder), again)
    drive(make_app(SessionStore().list()[0].id), again)


def test_stop_reading_and_resume(home, make_app, fake):
    folder = make_folder(home / "repo")
    fake.hold_at = 120

    async def scenario(pilot):
        screen = await wait_for_screen(pilot, "ReadingScreen")
        await wait_in_thread(fake.holding)
        await pilot.press("escape")
        fake.release.set()
        await wait_for(pilot, lambda: screen.phase == "stopped", what="the stop")
        assert "stopped after 120 of 426 tokens" in text_of(screen, "#reading-problem")
        assert "press r to resume" in text_of(screen, "#reading-advice")
        assert SessionStore().list()[0].read_position == 120
        await pilot.press("r")
        chat = await wait_for_screen(pilot, "ChatScreen")
        assert text_of(chat, "#chat-note") == "read 306 tokens"

    drive(make_app(folder), scenario)


def read_folders(home, make_app, names=("alpha", "beta")) -> None:
    """One session per name, each read by the app as a user would."""

    async def read(pilot):
        await wait_for_screen(pilot, "ChatScreen")

    for name in names:
        drive(make_app(make_folder(home / name)), read)


def test_sessions_rename_and_delete(home, make_app, fake):
    read_folders(home, make_app)

    async def scenario(pilot):
        screen = await wait_for_screen(pilot, "SessionsScreen")
        table = screen.query_one(DataTable)
        await wait_for(pilot, lambda: table.row_count == 2, what="the list")
        await pilot.press("r")
        prompt = await wait_for_screen(pilot, "TextPrompt")
        prompt.query_one(Input).value = "renamed"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "renamed" in {s.name for s in SessionStore().list()}, what="the rename")
        await wait_for(
            pilot,
            lambda: any(str(table.get_row_at(i)[0]) == "renamed" for i in range(table.row_count)),
            what="the renamed row",
        )
        await pilot.press("d")
        confirm = await wait_for_screen(pilot, "Confirm")
        await pilot.press("enter")  # the focused button is "Keep": nothing is deleted
        await wait_for_screen(pilot, "SessionsScreen")
        assert len(SessionStore().list()) == 2
        await pilot.press("d")
        confirm = await wait_for_screen(pilot, "Confirm")
        await pilot.click("#confirm")
        await wait_for(pilot, lambda: table.row_count == 1, what="the deletion")
        assert confirm.is_attached is False

    drive(make_app(), scenario)
    assert len(SessionStore().list()) == 1


def test_a_damaged_session_is_said_in_the_list_and_the_others_open(home, make_app, fake):
    read_folders(home, make_app)
    damaged = SessionStore().list()[0]
    (damaged.folder / "session.json").write_text('{"checksum": "0", "payload": {"segments": [{"start": "0"}]}}')

    async def scenario(pilot):
        screen = await wait_for_screen(pilot, "SessionsScreen")
        table = screen.query_one(DataTable)
        await wait_for(pilot, lambda: table.row_count == 1, what="the list")
        note = text_of(screen, "#sessions-unreadable")
        assert note.startswith(f"1 session cannot be read and is not listed ({damaged.id}: ")
        assert "sessions rm ID" in note
        await pilot.press("enter")
        await wait_for_screen(pilot, "ChatScreen")

    drive(make_app(), scenario)


def test_unreadable_path_is_explained_and_the_app_stays_usable(home, make_app):
    folder = make_folder(home / "repo")

    async def scenario(pilot):
        screen = await wait_for_screen(pilot, "ReadingScreen")
        await wait_for(pilot, lambda: screen.phase == "failed", what="the failure")
        assert "no such file, folder or session id" in text_of(screen, "#reading-problem")
        assert "ctrl+n" in text_of(screen, "#reading-advice")
        await pilot.press("ctrl+n")
        prompt = await wait_for_screen(pilot, "TextPrompt")
        prompt.query_one(Input).value = str(folder)
        await pilot.press("enter")
        await wait_for_screen(pilot, "ChatScreen")

    drive(make_app(home / "missing"), scenario)


def test_a_model_that_does_not_load_is_reported_and_sessions_still_work(home, make_app):
    from kimi_desk.engine.errors import CheckpointError

    def broken(model, device):
        raise CheckpointError("/models/broken: no config.json")

    async def scenario(pilot):
        dialog = await wait_for_screen(pilot, "ProblemDialog")
        assert "/models/broken: no config.json" in str(dialog.query(Static)[1].render())
        assert "--model PATH" in str(dialog.query(Static)[2].render())
        await pilot.press("enter")
        sessions = await wait_for_screen(pilot, "SessionsScreen")
        await wait_for(pilot, lambda: "No sessions yet" in text_of(sessions, "#sessions-info"), what="the list")
        assert "not loaded" in text_of(sessions, "#status-line")

    drive(make_app(engine_factory=broken), scenario)


def test_out_of_memory_while_reading_says_what_to_do(home, make_app, fake):
    folder = make_folder(home / "repo")

    def no_memory(*args, **kwargs):
        raise MemoryError()

    fake.read = no_memory

    async def scenario(pilot):
        screen = await wait_for_screen(pilot, "ReadingScreen")
        await wait_for(pilot, lambda: screen.phase == "failed", what="the failure")
        assert text_of(screen, "#reading-problem") == "Out of memory while reading."
        assert "--device cpu" in text_of(screen, "#reading-advice")

    drive(make_app(folder), scenario)


def test_settings_are_edited_saved_and_used(home, make_app, fake):
    folder = make_folder(home / "repo")

    async def scenario(pilot):
        await wait_for_screen(pilot, "ChatScreen")
        await pilot.press("f3")
        form = await wait_for_screen(pilot, "SettingsScreen")
        form.query_one("#temperature", Input).value = "abc"
        await pilot.click("#save")
        assert "temperature must be a number" in str(form.query_one("#settings-error").render())
        form.query_one("#temperature", Input).value = "0.2"
        form.query_one("#max_new_tokens", Input).value = "7"
        form.query_one("#seed", Input).value = "42"
        await pilot.pause(0.3)  # a button ignores a second press while it still shows the first
        await pilot.click("#save")
        await wait_for_screen(pilot, "ChatScreen")
        settings_file = home / "kimi-home" / "settings.toml"
        await wait_for(pilot, settings_file.exists, what="the settings file")
        await ask(pilot)
        await wait_for_answer(pilot)
        sampling, max_new_tokens = fake.samplings[-1]
        assert (sampling.temperature, sampling.seed, max_new_tokens) == (0.2, 42, 7)
        assert "cut at the token limit" in str(pilot.app.screen.query_one(TurnView).query_one(".meta").render())

    drive(make_app(folder), scenario)
    from kimi_desk.app.settings import load_settings

    settings, unknown = load_settings(home / "kimi-home" / "settings.toml")
    assert (settings.temperature, settings.max_new_tokens, settings.seed, unknown) == (0.2, 7, 42, [])


def test_command_palette_runs_the_main_actions(home, make_app, fake):
    folder = make_folder(home / "repo")

    async def scenario(pilot):
        chat = await chat_with_an_answer(pilot)
        await pilot.press("ctrl+p")
        await wait_for_screen(pilot, "CommandPalette")
        await pilot.press(*"regen")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(fake.asked) == 2, what="the regeneration")
        await wait_for_answer(pilot)
        await pilot.press("ctrl+p")
        await wait_for_screen(pilot, "CommandPalette")
        await pilot.press(*"sessions")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for_screen(pilot, "SessionsScreen")
        assert chat is not None

    drive(make_app(folder), scenario)


def test_help_lists_the_keys_of_every_screen(home, make_app):
    async def scenario(pilot):
        await wait_for_screen(pilot, "SessionsScreen")
        await pilot.press("f1")
        await wait_for_screen(pilot, "HelpScreen")
        text = "\n".join(f"{key} {description}" for _, keys in pilot.app.key_help() for key, description in keys)
        for expected in (
            "Stop",
            "Regenerate",
            "Copy the selected or last answer",
            "Rename",
            "Delete",
            "Stop reading",
            "Resume",
            "Settings",
            "Command palette",
        ):
            assert expected in text, expected
        await pilot.press("escape")
        await wait_for_screen(pilot, "SessionsScreen")

    drive(make_app(), scenario)


def test_the_tui_module_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, kimi_desk.app.tui, kimi_desk.app.cli\n"
        "assert 'torch' not in sys.modules and 'kimi_desk.engine.session' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reading_screen_labels_fit(home, make_app):
    # The labels the progress rows are built from are plain text, never markup (paths can hold '[').
    folder = make_folder(home / "odd[name]")

    async def scenario(pilot):
        chat = await wait_for_screen(pilot, "ChatScreen")
        assert "odd[name]" in str(chat.query_one(Input).placeholder)
        assert isinstance(chat.query_one("#gauge-tokens"), Label)

    drive(make_app(folder), scenario)


def test_open_from_the_sessions_list_and_come_back(home, make_app, fake):
    folder = make_folder(home / "repo")

    async def scenario(pilot):
        await wait_for_screen(pilot, "ChatScreen")
        await pilot.press("f2")
        sessions = await wait_for_screen(pilot, "SessionsScreen")
        await wait_for(pilot, lambda: sessions.query_one(DataTable).row_count == 1, what="the list")
        await pilot.press("escape")
        await wait_for_screen(pilot, "ChatScreen")
        await pilot.press("f2")
        await wait_for_screen(pilot, "SessionsScreen")
        await wait_for(pilot, lambda: pilot.app.screen.query_one(DataTable).row_count == 1, what="the list")
        await pilot.press("enter")
        chat = await wait_for_screen(pilot, "ChatScreen")
        assert text_of(chat, "#chat-note") == "resumed: 0 tokens to read"

    drive(make_app(folder), scenario)


def test_the_theme_chosen_is_remembered(home, make_app):
    from kimi_desk.app.settings import load_settings

    async def scenario(pilot):
        await wait_for_screen(pilot, "SessionsScreen")
        pilot.app.theme = "textual-light"
        settings_file = home / "kimi-home" / "settings.toml"
        await wait_for(pilot, settings_file.exists, what="the settings file")

    drive(make_app(), scenario)
    assert load_settings(home / "kimi-home" / "settings.toml")[0].theme == "textual-light"


def test_a_failed_answer_is_explained_and_asked_again_by_regenerate(home, make_app, fake):
    folder = make_folder(home / "repo")
    real_ask = fake.ask
    failures = [MemoryError()]

    def ask_failing_once(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real_ask(*args, **kwargs)

    fake.ask = ask_failing_once

    async def scenario(pilot):
        chat = await chat_with_an_answer(pilot)
        turn = chat.query_one(TurnView)
        assert "Out of memory while answering." in str(turn.query_one(".meta").render())
        assert turns(chat.session) == []
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: fake.asked == [QUESTION], what="the question asked again")
        await wait_for_answer(pilot)
        assert [t.question for t in turns(chat.session)] == [QUESTION]
        assert turn.answer_text == turns(chat.session)[0].answer != ""

    drive(make_app(folder), scenario)


def test_follow_ups_continue_the_thread_and_a_new_thread_starts_from_the_document(home, make_app, fake):
    folder = make_folder(home / "repo")

    async def scenario(pilot):
        chat = await chat_with_an_answer(pilot)
        first = chat.thread
        assert first is not None and fake.asked_in == [(None, 0)]
        await ask(pilot, "and where is it called?")
        await wait_for_answer(pilot)
        assert fake.asked_in[-1] == (first, 1) and chat.thread == first
        gauge = text_of(chat, "#gauge-state")
        assert f"thread {turns(chat.session)[0].tokens + turns(chat.session)[1].tokens}" in gauge
        await pilot.press("ctrl+r")  # regenerates the follow-up: the turn before it stays
        await wait_for(pilot, lambda: len(fake.asked) == 3, what="the regeneration")
        await wait_for_answer(pilot)
        assert fake.asked_in[-1] == (first, 1) and len(turns(chat.session)) == 2

        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: chat.thread is None and not chat.query(TurnView), what="the new thread")
        assert "thread 0 ·" in text_of(chat, "#gauge-state")
        await ask(pilot, "what is in file_3.py?")
        await wait_for_answer(pilot)
        second = chat.thread
        assert second not in (None, first) and fake.asked_in[-1] == (None, 0)
        assert len(chat.session.threads) == 2

        # Back to the first thread from the list beside the chat: its two turns, and the next question continues it.
        threads = chat.query_one("#threads")
        threads.highlighted = threads.get_option_index(first)
        threads.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: chat.thread == first and len(chat.query(TurnView)) == 2, what="the switch")
        await ask(pilot, "and what else?")
        await wait_for_answer(pilot)
        assert fake.asked_in[-1] == (first, 2)

    drive(make_app(folder), scenario)


def test_citations_open_the_source_pane_at_the_cited_line(home, make_app, fake):
    folder = make_folder(home / "repo")

    async def scenario(pilot):
        chat = await chat_with_an_answer(pilot)
        turn = chat.query(TurnView).last()
        await wait_for(pilot, lambda: turn.citations, what="the citations")
        assert [(c.label, c.found) for c in turn.citations] == [("file_2.py:1", True), ("lib/other.py:4", False)]
        assert "✗ lib/other.py:4 (not found)" in text_of(turn, ".sources")
        await pilot.press("ctrl+o")
        pane = chat.query_one("#source-pane")
        await wait_for(pilot, lambda: pane.display and chat.focused is pane, what="the source pane")
        assert "file_2.py:1" in text_of(pane, "#source-title")
        syntax = pane.query_one("#source-text").content  # the rich Syntax shown
        assert syntax.code.startswith("def helper_2") and syntax.highlight_lines == {1}
        await pilot.press("n")
        await wait_for(pilot, lambda: "Not found in the document" in text_of(pane, "#source-text"), what="the next")
        await pilot.press("escape")
        assert not pane.display and chat.focused is chat.query_one("#question")
        # A click on a place in the answer opens it too.
        chat.open_citation(turn.id, 0)
        await wait_for(pilot, lambda: pane.display, what="the pane again")

    drive(make_app(folder), scenario)


def test_a_session_reopens_on_its_most_recent_thread(home, make_app, fake):
    folder = make_folder(home / "repo")

    async def first_visit(pilot):
        await wait_for_screen(pilot, "ChatScreen")
        await ask(pilot)
        await wait_for_answer(pilot)
        await ask(pilot, "and then?")
        await wait_for_answer(pilot)

    drive(make_app(folder), first_visit)

    async def second_visit(pilot):
        chat = await wait_for_screen(pilot, "ChatScreen")
        assert [view.question for view in chat.query(TurnView)] == [QUESTION, "and then?"]
        await ask(pilot, "and after that?")
        await wait_for_answer(pilot)
        assert fake.asked_in[-1] == (chat.thread, 2)

    drive(make_app(folder), second_visit)


def test_the_demo_model_says_what_its_answers_are_worth(home, make_app, fake):
    from kimi_desk.app.backend import ModelChoice

    folder = make_folder(home / "repo")
    app = make_app(folder)
    app.model_choice = ModelChoice("/demo", "demo")

    async def scenario(pilot):
        chat = await wait_for_screen(pilot, "ChatScreen")
        note = text_of(chat, "#chat-demo")
        assert chat.query_one("#chat-demo").display and "often invents" in note and "kimi-desk pull" in note
        assert "is in the model's memory" not in text_of(chat, "#chat-empty")

    drive(app, scenario)


def test_a_new_model_in_settings_loads_for_the_next_session_opened(home, make_app, fake):
    """Model, device, format and memory budgets: not under the open chat (its session was read with the
    model in hand) but when the next session is opened; at once where no session is open."""
    from kimi_desk.app.settings import Settings

    folder = make_folder(home / "repo")
    other = home / "other-model"
    other.mkdir()
    loads = []

    def factory(model, device):
        loads.append((model, device, pilot_app.quantize, pilot_app.gpu_memory))
        return fake

    pilot_app = make_app(folder, engine_factory=factory)

    async def scenario(pilot):
        await wait_for_screen(pilot, "ChatScreen")
        assert loads == [("fake-model", "cpu", "auto", None)]
        pilot.app._settings_chosen(Settings(model=str(other), device="cpu", quantize="int8"))
        await pilot.pause()
        assert len(loads) == 1 and pilot.app.engine_stale  # the chat keeps its model
        pilot.app.open_target(str(folder))
        await wait_for_screen(pilot, "ChatScreen")
        assert loads[-1] == (str(other), "cpu", "int8", None) and not pilot.app.engine_stale
        await pilot.press("f2")
        await wait_for_screen(pilot, "SessionsScreen")
        pilot.app.current_chat = None
        pilot.app._settings_chosen(Settings(model=str(other), device="auto", quantize="int8"))
        await wait_for(pilot, lambda: len(loads) == 3, what="the load at once")
        assert loads[-1] == (str(other), "auto", "int8", None)
        await wait_for(pilot, lambda: pilot.app.engine_status == "ready", what="the engine")
        # A memory budget is a load setting too.
        pilot.app._settings_chosen(Settings(model=str(other), device="auto", quantize="int8", gpu_memory="24GiB"))
        await wait_for(pilot, lambda: len(loads) == 4, what="the load with the budget")
        assert loads[-1] == (str(other), "auto", "int8", "24GiB")
        await wait_for(pilot, lambda: pilot.app.engine_status == "ready", what="the engine")

    drive(pilot_app, scenario)


def test_reading_goes_on_while_the_user_chats_in_another_session(home, make_app, fake):
    """One model, one queue, and the UI never waits: a reading left for the sessions list keeps going
    (the status line follows it), another session is opened and asked meanwhile, and coming back to the
    reading's target shows it where it is; when it ends the user is told."""
    first = make_folder(home / "first")
    second = make_folder(home / "second", n_files=9)

    async def scenario(pilot):
        app = pilot.app
        await wait_for_screen(pilot, "ChatScreen")  # `first`, read
        fake.hold_at = 160
        app.open_target(str(second))
        await wait_for_screen(pilot, "ReadingScreen")
        await wait_in_thread(fake.holding)
        await pilot.press("f2")
        await wait_for_screen(pilot, "SessionsScreen")
        await wait_for(pilot, lambda: "reading second" in app.status, what="the reading in the status line")
        assert app.readings[str(second)].running
        app.open_target(str(first))
        chat = await chat_with_an_answer(pilot)
        assert turns(chat.session)[-1].finish_reason == "stop" and app.readings[str(second)].running

        app.open_target(str(second))  # back to the reading, where it is
        reading = await wait_for_screen(pilot, "ReadingScreen")
        assert reading.phase == "reading" and "160 /" in text_of(reading, "#tokens-count")
        await pilot.press("f2")
        await wait_for_screen(pilot, "SessionsScreen")
        fake.release.set()
        await wait_for(pilot, lambda: not app.readings, what="the end of the reading")
        assert any("'second' is read" in str(n.message) for n in app._notifications)
        assert "reading second" not in app.status

    drive(make_app(first), scenario)
    assert sorted(s.name for s in SessionStore().list()) == ["first", "second"]
    assert all(s.complete for s in SessionStore().list())


def test_a_long_wait_for_the_first_words_shows_the_time_waited(home, make_app, fake):
    """'thinking…' alone for 30 s looks stuck: the seconds waited are shown until the first text."""
    folder = make_folder(home / "repo")
    fake.answer_hold_after = 0

    async def scenario(pilot):
        chat = await wait_for_screen(pilot, "ChatScreen")
        await ask(pilot)
        await wait_in_thread(fake.answering)
        meta = lambda: str(chat.query_one(TurnView).query_one(".meta").render())  # noqa: E731
        await wait_for(pilot, lambda: meta().startswith("thinking… ") and meta().endswith(" s"), what="the time waited")
        assert meta() in ("thinking… 1 s", "thinking… 2 s"), meta()
        fake.answer_release.set()
        await wait_for_answer(pilot)
        assert "tokens · " in meta()

    drive(make_app(folder), scenario)


def test_editing_a_question_asks_it_again_from_the_state_before_it(home, make_app, fake):
    """ctrl+e puts the selected (or last) question in the input: the last one edited replaces its turn
    in the thread; an earlier one starts a new thread from the turns before it, and the old thread keeps
    its turns. Escape gives up editing."""
    folder = make_folder(home / "repo")

    async def scenario(pilot):
        chat = await chat_with_an_answer(pilot)
        first = chat.thread
        await ask(pilot, "and where is it called?")
        await wait_for_answer(pilot)
        field = chat.query_one("#question", Input)

        await pilot.press("ctrl+e")
        assert field.value == "and where is it called?" and "Editing question 2" in str(field.border_title)
        await pilot.press("escape")
        assert field.value == "" and not field.border_title and chat._editing is None

        await pilot.press("ctrl+e")
        field.value = "and where is helper_2 called?"
        await pilot.press("enter")
        await wait_for_answer(pilot)
        assert fake.asked_in[-1] == (first, 1) and chat.thread == first
        assert [t.question for t in turns(chat.session)] == [QUESTION, "and where is helper_2 called?"]
        assert [v.question for v in chat.query(TurnView)] == [QUESTION, "and where is helper_2 called?"]

        chat.query_one("#turn-0", TurnView).focus()
        await pilot.press("ctrl+e")
        assert field.value == QUESTION
        field.value = "what does helper_3 return?"
        await pilot.press("enter")
        await wait_for_answer(pilot)
        await wait_for(pilot, lambda: chat.thread != first, what="the new thread")
        assert fake.asked_in[-1] == (first, 0)
        assert [t.question for t in chat.session.thread(chat.thread).turns] == ["what does helper_3 return?"]
        assert [t.question for t in chat.session.thread(first).turns] == [QUESTION, "and where is helper_2 called?"]
        assert [v.question for v in chat.query(TurnView)] == ["what does helper_3 return?"]

    drive(make_app(folder), scenario)


def test_the_engines_notices_reach_the_user_once(home, make_app, monkeypatch):
    """The real engine factory hands the loader's one-line notices (the format and placement it chose)
    to the app, which shows each once; a notice posted from the chat's answer worker is shown once too."""
    from kimi_desk.app import backend
    from kimi_desk.app.messages import EngineNotice

    def load_assistant(model, device, quantize="auto", gpu_memory=None, cpu_memory=None, notice=lambda line: None):
        notice("int4: the bf16 weights do not fit 16.0 GiB of GPU memory")
        return FakeAssistant()

    monkeypatch.setattr(backend, "load_assistant", load_assistant)
    folder = make_folder(home / "repo")

    async def scenario(pilot):
        await wait_for_screen(pilot, "ChatScreen", timeout=20)
        texts = [str(n.message) for n in pilot.app._notifications]
        assert texts.count("int4: the bf16 weights do not fit 16.0 GiB of GPU memory") == 1
        pilot.app.screen.post_message(EngineNotice("thread t1 rebuilt from its transcript"))
        await pilot.pause(0.1)
        texts = [str(n.message) for n in pilot.app._notifications]
        assert texts.count("thread t1 rebuilt from its transcript") == 1

    drive(make_app(folder, engine_factory=None), scenario)
