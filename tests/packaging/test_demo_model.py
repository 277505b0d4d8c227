"""The demo model's training pipeline (packaging/demo_model), at toy scale on the CPU: corpus shards
and manifest from a fake source tree, the differentiable forward against the engine's, retrieval
samples, and a two-step training run that writes a checkpoint the engine loads."""

from __future__ import annotations

import argparse
import inspect
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "packaging" / "demo_model"))

import corpus_tokens  # noqa: E402
import evaluate  # noqa: E402
import prepare_corpus  # noqa: E402
import retrieval_samples  # noqa: E402
import task_samples  # noqa: E402
import train  # noqa: E402
import train_tokenizer  # noqa: E402
import training_forward  # noqa: E402

from kimi_desk.bench.random_checkpoint import random_model, tail7_config, tiny_config  # noqa: E402
from kimi_desk.engine import load_model  # noqa: E402
from kimi_desk.engine.chat import DEFAULT_SYSTEM_PROMPT, document_head_ids, next_turn_token_ids, question_ids  # noqa: E402
from kimi_desk.engine.ingest import load_path  # noqa: E402
from kimi_desk.engine.tokenizer import load_tokenizer  # noqa: E402
from kimi_desk.kernels.kda.naive import chunk_kda_torch, recurrent_kda  # noqa: E402

# -- the differentiable forward --------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 63, 130])
def test_chunk_kda_autograd_matches_the_engine_and_the_recurrence(T):
    gen = torch.Generator().manual_seed(T)
    B, H, K, V = 2, 2, 32, 16
    q = training_forward.l2norm(torch.randn(B, T, H, K, generator=gen))
    k = training_forward.l2norm(torch.randn(B, T, H, K, generator=gen))
    v = torch.randn(B, T, H, V, generator=gen)
    # Decays from nearly none to exp(-100) per step: far past what exp(G_i) * exp(-G_j) survives.
    g = -torch.rand(B, T, H, K, generator=gen) * torch.logspace(-3, 2, K)
    beta = torch.rand(B, T, H, generator=gen)
    probe = torch.randn(B, T, H, V, generator=gen)

    ours = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    reference = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    out = training_forward.chunk_kda_autograd(*ours)
    expected, _ = chunk_kda_torch(q, k, v, g, beta)
    assert (out - expected).abs().max() < 1e-5
    (out * probe).sum().backward()
    (recurrent_kda(*reference)[0] * probe).sum().backward()
    for mine, theirs in zip(ours, reference):
        assert torch.isfinite(mine.grad).all()
        assert (mine.grad - theirs.grad).abs().max() <= 1e-4 * (1 + theirs.grad.abs().max())


@pytest.mark.parametrize("config", [tiny_config(), tail7_config()], ids=["tiny", "tail7"])
def test_training_forward_equals_the_inference_forward(config):
    model = random_model(config, seed=3)
    ids = torch.randint(0, config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    expected = model(ids, model.new_state(2))
    for name, param in model.named_parameters():
        param.requires_grad_(not name.endswith("e_score_correction_bias"))
    logits = training_forward.training_logits(model, ids)
    assert (logits - expected).abs().max() < 1e-4

    logits.log_softmax(-1)[..., 0].mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    # The expert and shared-expert weights learn too (routing is not cut off from the loss).
    assert any(p.grad.abs().sum() > 0 for n, p in trainable if ".experts.w1" in n)


def test_weighted_loss_is_cross_entropy_on_the_weighted_positions():
    model = random_model(tiny_config(), seed=1)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    weights = torch.zeros(2, 40)
    weights[0, 5:9] = 1.0
    weights[1, 30] = 0.5
    hidden = training_forward.training_hidden(model, ids)
    logits = model.lm_head(hidden).float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), targets.reshape(-1), reduction="none")
    expected = (ce * weights.reshape(-1)).sum()
    got = training_forward.weighted_lm_loss(model, hidden, targets, weights, chunk_tokens=3)
    assert torch.allclose(got, expected, rtol=1e-5)


# -- corpus, tokenizer, samples --------------------------------------------------------------------


def _fake_source_tree(root: Path) -> Path:
    """Folders of real Python text (a few standard-library modules, cut into files), a manual of HTML
    pages, a binary, a minified file and a duplicate."""
    import argparse as module_a
    import json.decoder as module_b
    import textwrap as module_c

    tree = root / "fake-src"
    sources = [inspect.getsource(m) for m in (module_a, module_b, module_c)]
    for number in range(12):
        text = sources[number % 3]
        piece = len(text) // 4
        folder = tree / f"pkg{number:02d}"
        folder.mkdir(parents=True)
        for part in range(3):
            body = f"# package {number}, part {part}\n" + text[part * piece : (part + 1) * piece] + "\n"
            (folder / f"mod{part}.py").write_text(body, encoding="utf-8")
    (tree / "pkg00" / "README.md").write_text("# pkg00\n\nThe first package.\n", encoding="utf-8")
    (tree / "pkg01" / "copy_of_mod0.py").write_text((tree / "pkg01" / "mod0.py").read_text(), encoding="utf-8")
    (tree / "pkg02" / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (tree / "pkg03" / "bundle.min.py").write_text("x=1;" * 5000 + "\n", encoding="utf-8")
    manual = root / "fake-manual"
    manual.mkdir()
    for page in range(3):
        (manual / f"page{page}.html").write_text(
            f"<html><head><title>Page {page}</title></head><body><h1>Chapter {page}</h1>"
            f"<p>The manual explains configuration option number {page} in detail.</p></body></html>",
            encoding="utf-8",
        )
    (manual / "COPYING").write_text("Public domain.\n", encoding="utf-8")
    (tree / "LICENSE").write_text("MIT licence text.\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def toy_pipeline(tmp_path_factory):
    """A corpus from the fake tree, a small tokenizer trained on it, and both splits tokenized."""
    root = _fake_source_tree(tmp_path_factory.mktemp("sources"))
    sources = [
        prepare_corpus.Source(
            "fake-code",
            "fakeproj",
            "MIT",
            None,
            str(root / "fake-src"),
            ("**/*.py", "**/*.md"),
            str(root / "fake-src" / "LICENSE"),
        ),
        prepare_corpus.Source(
            "fake-manual",
            "fake-manual",
            "public-domain",
            None,
            str(root / "fake-manual"),
            ("*.html",),
            str(root / "fake-manual" / "COPYING"),
            html=True,
        ),
    ]
    corpus = tmp_path_factory.mktemp("corpus")
    manifest = prepare_corpus.build_corpus(
        sources, corpus, root / "work", heldout_fraction=0.25, max_document_chars=6000, log=lambda *_: None
    )
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    texts = train_tokenizer.training_texts(corpus, None)
    train_tokenizer.write_tokenizer(texts, 400, tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    splits = {
        split: corpus_tokens.tokenize_split(corpus, tokenizer, split, log=lambda *_: None)
        for split in ("train", "heldout")
    }
    return {
        "root": root,
        "corpus": corpus,
        "manifest": manifest,
        "tokenizer_dir": tokenizer_dir,
        "tokenizer": tokenizer,
        "splits": splits,
    }


def test_corpus_shards_manifest_and_heldout_split(toy_pipeline):
    corpus, manifest = toy_pipeline["corpus"], toy_pipeline["manifest"]
    on_disk = json.loads((corpus / "manifest.json").read_text())
    assert on_disk == manifest
    assert [s["name"] for s in manifest["sources"]] == ["fake-code", "fake-manual"]
    assert manifest["sources"][0]["license"] == "MIT"
    assert (corpus / manifest["sources"][0]["license_file"]).read_text() == "MIT licence text.\n"
    for split in ("train", "heldout"):
        info = manifest["splits"][split]
        assert info["documents"] > 0, f"no {split} documents"
        for shard in info["shards"]:
            assert (corpus / shard["name"]).stat().st_size == shard["file_bytes"]

    train_docs = list(prepare_corpus.read_documents(corpus, "train"))
    heldout_docs = list(prepare_corpus.read_documents(corpus, "heldout"))
    assert {d["id"] for d in train_docs}.isdisjoint(d["id"] for d in heldout_docs)
    paths = [f["path"] for d in train_docs + heldout_docs for f in d["files"]]
    # Binaries, minified files and exact duplicates are left out, as the reader leaves them out.
    assert not any(p.endswith((".bin", ".min.py")) for p in paths)
    assert len({"pkg01/copy_of_mod0.py", "pkg01/mod0.py"} & set(paths)) == 1
    # HTML pages become their readable text, under a .txt name.
    manual = [f for d in train_docs + heldout_docs if d["source"] == "fake-manual" for f in d["files"]]
    assert manual and all(f["path"].endswith(".txt") and "<p>" not in f["text"] for f in manual)
    assert (
        sum(len(f["text"].encode()) for d in train_docs for f in d["files"])
        == manifest["splits"]["train"]["text_bytes"]
    )


def test_documents_render_as_kimi_desk_renders_a_folder(toy_pipeline, tmp_path):
    doc = next(prepare_corpus.read_documents(toy_pipeline["corpus"], "train"))
    folder = tmp_path / doc["root"]
    for file in doc["files"]:
        (folder / file["path"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / file["path"]).write_text(file["text"], encoding="utf-8")
    assert load_path(folder).text == prepare_corpus.render_document(doc)


def test_token_cache_holds_each_segment_and_is_reused(toy_pipeline):
    tokenizer, split = toy_pipeline["tokenizer"], toy_pipeline["splits"]["train"]
    doc = next(prepare_corpus.read_documents(toy_pipeline["corpus"], "train"))
    segments = prepare_corpus.document_segments(doc)
    for offset, text in enumerate(segments):
        assert split.segment_ids(offset).tolist() == tokenizer.encode(text, allow_special=False)
    # Segment by segment is the encoding of the whole text (what a session's reading relies on).
    assert split.document_ids(0).tolist() == tokenizer.encode("".join(segments), allow_special=False)
    again = corpus_tokens.tokenize_split(toy_pipeline["corpus"], tokenizer, "train", log=pytest.fail)
    assert torch.equal(again.tokens, split.tokens)


def test_retrieval_sample_places_the_fact_and_masks_the_loss_to_the_answer(toy_pipeline):
    tokenizer = toy_pipeline["tokenizer"]
    builder = retrieval_samples.RetrievalSampleBuilder(toy_pipeline["splits"]["train"], tokenizer)
    im_end = tokenizer.special_tokens["<|im_end|>"]
    for seed, depth in enumerate([0.0, 0.5, 0.95]):
        sample = builder.build(1500, random.Random(seed), depth=depth, num_distractors=2, kind="port")
        ids = sample.input_ids
        assert len(ids) <= 1500
        head = document_head_ids(tokenizer, DEFAULT_SYSTEM_PROMPT)
        question = question_ids(tokenizer, sample.fact.question)
        assert ids[: sample.document_start] == head
        assert ids[sample.document_end : sample.answer_start] == question
        assert ids[sample.answer_start :] == tokenizer.encode(sample.fact.answer, allow_special=False) + [im_end]
        document = tokenizer.decode(ids[sample.document_start : sample.document_end])
        assert document.startswith("==> ") and document.endswith("\n\n")
        assert document.count(sample.fact.statement) == 1
        for distractor in sample.distractors:
            assert distractor.key != sample.fact.key and distractor.statement in document
        assert tokenizer.decode(ids[sample.fact_position :]).lstrip("# ").startswith(sample.fact.statement)
        assert abs(sample.depth - depth) < 0.5

        weights = sample.target_weights()
        assert len(weights) == len(ids) - 1
        # Targets are ids[1:]: weight i belongs to ids[i + 1]; only the reply and its <|im_end|> count.
        weighted = [ids[i + 1] for i, w in enumerate(weights) if w > 0]
        assert weighted == ids[sample.answer_start :]
        with_document = sample.target_weights(document_weight=0.1)
        assert sum(1 for w in with_document if w == 0.1) == sample.document_end - sample.document_start - 1


def _readme_kind_samples(toy_pipeline, count: int, tokens: int, distractors: int):
    """`count` needles of the README's kinds (command, variable alternately) and each one's document text."""
    builder = retrieval_samples.RetrievalSampleBuilder(toy_pipeline["splits"]["train"], toy_pipeline["tokenizer"])
    for seed in range(count):
        kind = ("command", "variable")[seed % 2]
        sample = builder.build(tokens, random.Random(seed), num_distractors=distractors, kind=kind)
        document = toy_pipeline["tokenizer"].decode(sample.input_ids[sample.document_start : sample.document_end])
        yield sample, document


def test_readme_kinds_are_planted_beside_their_other_kind_half_the_time(toy_pipeline):
    """A command's needle sometimes also holds the same tool's variable line (and the other way round),
    at the same depth, so that the asked line must be told from its README neighbour."""
    with_neighbour = 0
    for sample, document in _readme_kind_samples(toy_pipeline, 12, tokens=1500, distractors=0):
        kind = sample.fact.kind
        others = [d for d in sample.distractors if d.kind != kind]
        assert len(others) <= 1 and len(sample.input_ids) <= 1500
        for other in others:
            tool = sample.fact.key.split("|")[0].lower().replace("_", "-")
            assert other.key.split("|")[0].lower().replace("_", "-") == tool and other.statement in document
            with_neighbour += 1
    assert 0 < with_neighbour < 12


def test_readme_kinds_are_sometimes_rows_of_one_table(toy_pipeline):
    """A command or variable needle is sometimes a README of its own: under the tool's name, a table whose
    rows are the asked fact's, every distractor's and rows of other effects; the question and the reply
    are the fact's own, and only its row answers it."""
    tokenizer = toy_pipeline["tokenizer"]
    tables = 0
    for sample, document in _readme_kind_samples(toy_pipeline, 24, tokens=2000, distractors=2):
        fact = sample.fact
        if "\n" not in fact.statement:
            continue
        tables += 1
        assert fact.statement in document and sample.planted_path.endswith(("README.md", "USAGE.md"))
        rows = [line for line in fact.statement.split("\n") if line.startswith("| `")]
        tool = fact.key.split("|")[0]
        assert fact.statement.startswith(f"# {tool.lower().replace('_', '-')}\n")
        answering = [row for row in rows if f"`{fact.answer.split('`')[1]}`" in row]
        assert len(answering) == 1 and fact.key.split("|")[-1] in answering[0]
        for distractor in sample.distractors:
            assert any(f"`{distractor.answer.split('`')[1]}`" in row for row in rows)
        assert len(rows) > 1 + len(sample.distractors)  # rows of other effects too
        assert not any(
            "forces" in row
            for row in rows
            if row not in answering and not any(f"`{d.answer.split('`')[1]}`" in row for d in sample.distractors)
        )
        assert tokenizer.decode(sample.input_ids[sample.answer_start :]).startswith(fact.answer)
    assert 0 < tables < 24


def test_task_samples_weigh_every_reply_and_feed_the_next_turn(toy_pipeline):
    """Loss only on the replies (each with its <|im_end|>); a second turn is fed as a session would feed
    it after generating the first reply (next_turn_token_ids)."""
    tokenizer = toy_pipeline["tokenizer"]
    builder = task_samples.TaskSampleBuilder(toy_pipeline["splits"]["train"], tokenizer)
    im_end = tokenizer.special_tokens["<|im_end|>"]
    sample = builder.needle(600, random.Random(3), distractors=3, followup=True)
    assert len(sample.input_ids) <= 600 and len(sample.turns) == 2
    weights = sample.target_weights()
    weighted = [sample.input_ids[i + 1] for i, w in enumerate(weights) if w > 0]
    assert weighted == [i for a, b in sample.answer_spans for i in sample.input_ids[a:b]]
    assert all(sample.input_ids[b - 1] == im_end for _, b in sample.answer_spans)
    (a0, b0), (a1, b1) = sample.feeds
    assert sample.input_ids[a0:b0] == question_ids(tokenizer, sample.turns[0].question)
    assert sample.input_ids[a1:b1] == next_turn_token_ids(
        tokenizer, [{"role": "user", "content": sample.turns[1].question}]
    )
    assert task_samples.is_correct(sample.turns[0], tokenizer.decode(sample.input_ids[slice(*sample.answer_spans[0])]))
    assert sample.turns[1].expected == (sample.detail["path"],)
    # The distractors' values, for telling a confused reply from a made-up one; none is the asked value.
    values = sample.detail["distractor_values"]
    assert len(values) == 3 and sample.turns[0].expected[0] not in values
    document = tokenizer.decode(sample.input_ids[sample.document_start : sample.document_end])
    assert all(value in document for value in values)


@pytest.mark.parametrize("kind", sorted(retrieval_samples.ENTITY_NOUNS))
def test_a_follow_up_can_ask_about_the_key_the_first_answer_named(toy_pipeline, kind):
    """Entity follow-ups: every planted fact is followed by the same second sentence with a value of its
    own, and the second question names only "that service": the asked key's value is the answer and no
    other fact's. First questions may ask for the key by its value."""
    tokenizer = toy_pipeline["tokenizer"]
    builder = task_samples.TaskSampleBuilder(toy_pipeline["splits"]["train"], tokenizer)
    rng = random.Random()
    samples = [builder.needle(700, rng, distractors=2, kind=kind, followup=True, reverse_share=0.5) for _ in range(16)]
    entity = [s for s in samples if "that " + retrieval_samples.ENTITY_NOUNS[kind] in s.turns[1].question]
    assert entity and len(entity) < len(samples), "both kinds of follow-up"
    for sample in entity:
        document = tokenizer.decode(sample.input_ids[sample.document_start : sample.document_end])
        (first, second), key, values = sample.turns, sample.detail["key"], sample.detail["aspect_values"]
        assert values[0] == second.expected[0] and len(set(values)) == 3
        assert all(value in document for value in values)
        assert f"{first.answer} {second.answer}" in document  # the fact, then what is said of its key
        assert key not in second.question and key in first.answer
        assert task_samples.is_correct(second, second.answer)
        assert not any(task_samples.is_correct(second, other) for other in values[1:])
    reverse = [s for s in samples if s.turns[0].expected == (s.detail["key"],)]
    assert reverse, "first questions asked by value"
    assert all(s.detail["key"] not in s.turns[0].question for s in reverse)


@pytest.mark.parametrize("task", ["needle", "followup", "which_file", "where_function", "setting_default"])
def test_every_task_fits_its_token_budget(toy_pipeline, task):
    """Questions by value and entity follow-ups are longer than the question the haystack was built for:
    a sample is still never longer than asked (a training batch row would not hold it)."""
    builder = task_samples.TaskSampleBuilder(toy_pipeline["splits"]["train"], toy_pipeline["tokenizer"])
    rng = random.Random()
    for total in (1025, 1500, 2048) * 5:
        assert len(builder.build(task, total, rng).input_ids) <= total


def test_looked_up_reply_tokens_weigh_more(toy_pipeline):
    """The reply tokens the question does not hold (the value) take `looked_up_weight`; the words the reply
    repeats from the question, and <|im_end|>, keep weight 1."""
    tokenizer = toy_pipeline["tokenizer"]
    builder = task_samples.TaskSampleBuilder(toy_pipeline["splits"]["train"], tokenizer)
    sample = builder.needle(600, random.Random(5), distractors=2, kind="port")
    plain, weighted = sample.target_weights(), sample.target_weights(0.0, 4.0)
    (start, end), (feed_start, feed_end) = sample.answer_spans[0], sample.feeds[0]
    asked = set(sample.input_ids[feed_start:feed_end])
    for target in range(start, end):
        heavy = target < end - 1 and sample.input_ids[target] not in asked
        assert weighted[target - 1] == (4.0 if heavy else 1.0) and plain[target - 1] == 1.0
    heavy_text = tokenizer.decode([sample.input_ids[t] for t in range(start, end) if weighted[t - 1] == 4.0])
    assert sample.turns[0].expected[0] in heavy_text.replace(" ", "") or sample.turns[0].expected[0] in heavy_text
    assert [w for w in weighted if w not in (1.0, 4.0)] == [0.0] * weighted.count(0.0)


def test_plain_needles_plant_every_fact_and_ask_the_first(toy_pipeline):
    """A plain needle with 7 distractors fits a short context: every fact's sentence is in the document
    once, the question asks the first by its subject, and the reply to learn is its sentence."""
    tokenizer = toy_pipeline["tokenizer"]
    builder = task_samples.TaskSampleBuilder(toy_pipeline["splits"]["train"], tokenizer)
    rng = random.Random(11)
    for kind in ("plain", "plain_held_out"):
        sample = builder.needle(1500, rng, distractors=7, kind=kind)
        document = tokenizer.decode(sample.input_ids[: sample.answer_spans[0][0]])
        values = [sample.turns[0].expected[0], *sample.detail["distractor_values"]]
        assert len(set(values)) == 8 and all(document.count(v) >= 1 for v in values)
        assert sample.detail["key"].split("|")[1] in sample.turns[0].question
        assert sample.turns[0].answer.endswith(".") and values[0] in sample.turns[0].answer


def test_readme_questions_are_answered_by_readme_itself():
    """The README table's answers are README's own lines (the check follows README when it changes), and
    the check tells the command from another subcommand or a longer name."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for _, expected, right in evaluate.README_QUESTIONS:
        assert re.search(right, readme) and re.search(right, f"`{expected}` is the one.")
    sessions = evaluate.README_QUESTIONS[0][2]
    assert re.search(sessions, "`kimi-desk sessions` lists the saved sessions.")
    assert not any(re.search(sessions, r) for r in ("`kimi-desk sessions show ID`", "`kimi-desk sessions-db`"))


def test_wrong_needle_replies_are_told_apart_by_the_distractors_values():
    def outcome(reply, correct=False):
        return {"correct": correct, "distractor_values": ["4711", "9050"], "turns": [{"reply": reply}]}

    row = {"outcomes": [outcome("It is 4711."), outcome("It is 1234."), outcome("It is 1."), outcome("9", True)]}
    assert evaluate._wrong_kinds(row) == (1, 2) and evaluate._wrong_kinds(None) == (0, 0)


def _corpus_text(corpus: Path) -> str:
    """Every file of both splits as the model reads it: header and text."""
    from kimi_desk.engine.ingest.render import render_file_block

    return "\n".join(
        render_file_block(f["path"], f["text"])
        for split in ("train", "heldout")
        for d in prepare_corpus.read_documents(corpus, split)
        for f in d["files"]
    )


def _code_samples(toy_pipeline, task: str, count: int, fresh_names: bool = True):
    builder = task_samples.TaskSampleBuilder(
        toy_pipeline["splits"]["train"], toy_pipeline["tokenizer"], fresh_names=fresh_names, code_sources=("fake-code",)
    )
    rng = random.Random(f"code-{task}")
    samples = [builder.build(task, 6000, rng) for _ in range(5 * count)]
    samples = [s for s in samples if s.task == task and "renames" in s.detail][:count]
    assert len(samples) == count, f"too few {task} samples"
    return samples


@pytest.mark.parametrize("task", ["which_file", "where_function", "setting_default", "followup"])
def test_code_questions_are_answered_only_by_the_document(toy_pipeline, task):
    """Each code question's answer is in the sample's document and nowhere in the corpus: the names it asks
    about and answers with are made up for the sample (renamed in every file of the folder), the literal a
    default question asks for is fresh, and the files sit under a made-up folder."""
    tokenizer = toy_pipeline["tokenizer"]
    corpus = _corpus_text(toy_pipeline["corpus"])
    for sample in _code_samples(toy_pipeline, task, 3):
        document = tokenizer.decode(sample.input_ids[sample.document_start : sample.document_end])
        turn = sample.turns[0]
        if sample.detail["renames"] or sample.detail["literals"]:  # a needle's follow-up is not disguised
            assert sample.detail["prefix"] and all(
                f"==> {sample.detail['prefix']}/" in line
                for line in document.splitlines()
                if line.startswith("==> ") and "(folder tree" not in line
            )
            for old, new in sample.detail["renames"].items():
                assert re.search(rf"\b{re.escape(new)}\b", document), new
                assert not re.search(rf"\b{re.escape(new)}\b", corpus), f"{new} is in the corpus"
                assert not re.search(rf"\b{re.escape(old)}\b", document), f"{old} is still in the document"
            for _, new in sample.detail["literals"]:
                assert new in document
            asked = [new for new in sample.detail["renames"].values() if new in turn.question]
            assert asked or turn.question.split()[-2] in ("of", "in"), turn.question  # a dunder keeps its name
        for value in turn.expected:
            assert value in document
        if task in ("which_file", "where_function"):
            assert not any(value in corpus for value in turn.expected), turn.expected
        for later in sample.turns[1:]:
            assert all(v in document for v in later.expected) and (
                not later.any_of or any(v in document for v in later.any_of)
            )
        # What a reply writes between backticks is a piece of the document: what the app lets the
        # embedded model write there (engine/code_spans.py).
        spans = [span for t in sample.turns for span in re.findall(r"`([^`]*)`", t.answer)]
        assert spans and all(span in document for span in spans), spans


def test_disguised_folders_read_as_ingest_reads_them(toy_pipeline, tmp_path):
    """The document of a disguised sample is what `load_path` renders for a folder holding its files, and its
    ids are the tree's and each block's, encoded one by one as a session encodes them."""
    from kimi_desk.engine.chat import document_text

    tokenizer = toy_pipeline["tokenizer"]
    for number, sample in enumerate(_code_samples(toy_pipeline, "which_file", 3)):
        ids = sample.input_ids[sample.document_start : sample.document_end]
        document = tokenizer.decode(ids)
        tree, *blocks = re.split(r"(?m)^(?===> )", document)[1:]
        folder = tmp_path / str(number) / sample.detail["root"]
        for index, block in enumerate(blocks):
            header, text = block.split("\n", 1)
            # A block is its text, then one blank line; the last one ends where the document does.
            text = text[:-1] if index < len(blocks) - 1 else text.rstrip("\n") + "\n"
            path = folder / header.removeprefix("==> ").removesuffix(" <==")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        assert document == document_text(load_path(folder).text)
        pieces = [tree, *blocks]
        encoded = [i for piece in pieces[:-1] for i in tokenizer.encode(piece, allow_special=False)]
        assert ids == encoded + tokenizer.encode(pieces[-1], allow_special=False)


def test_fresh_names_keep_the_style_and_fresh_literals_the_kind():
    rng = random.Random(0)
    for like, style in (
        ("FindFailureTests", r"[A-Z][a-z]+[A-Z][a-z]+\w*"),
        ("cloned_traverse", r"[a-z]+_[a-z_]+"),
        ("MAX_SIZE", r"[A-Z]+_[A-Z_]+"),
        ("removeResult", r"[a-z]+[A-Z][a-z]+\w*"),
        ("_private_helper", r"_[a-z]+_[a-z_]+"),
    ):
        for _ in range(20):
            name = task_samples.fresh_name(like, rng, avoid=like)
            assert re.fullmatch(style, name) and name != like, (like, name)
    for value, kind in (
        ("30", r"\d+"),
        ("-1", r"-\d+"),
        ("0.5", r"\d\.\d"),
        ("'utf-8'", r"'[^'\n,]{1,22}'"),
        ('"strict"', r'"[^"\n,]{1,22}"'),
        ("True", "True|False"),
        ("None", "None"),
    ):
        for _ in range(20):
            new = task_samples.fresh_literal(value, rng)
            assert re.fullmatch(kind, new) and (new != value or value in ("True", "None")), (value, new)


def test_needle_keys_and_values_come_from_large_spaces():
    spaces = retrieval_samples.space_sizes()
    floors = {"date": 2 * 10**4, "plain": 10**3}  # plain: real words repeat as subjects, values are fresh
    for kind, space in spaces.items():
        assert space["keys"] >= 10**6, kind
        assert space["values"] >= floors.get(kind, 10**4), kind
    rng = random.Random(0)
    for kind in retrieval_samples.ALL_FACT_KINDS:
        facts = [
            retrieval_samples.make_fact(kind, retrieval_samples.fact_keys(kind, 1, rng)[0], rng) for _ in range(2000)
        ]
        if kind != "plain":
            assert len({f.key for f in facts}) >= 1980, kind
        assert len({(f.key, f.value) for f in facts}) >= 1980, kind


def _template_words(template: str) -> str:
    return template.replace("{S}", "{s}")


def test_plain_facts_held_out_wordings_are_never_trained():
    """The evaluation's plain facts are said and asked in wordings no training relation has, about
    nouns no training relation uses; each fact states its value and its question names its subject."""
    trained, held_out = retrieval_samples.PLAIN_RELATIONS, retrieval_samples.HELD_OUT_RELATIONS
    trained_forms = {_template_words(t) for r in trained.values() for t in r.statements + r.questions}
    trained_forms |= set(retrieval_samples.GENERIC_QUESTIONS)
    for relation in held_out.values():
        assert relation.noun not in {r.noun for r in trained.values()}
        assert not trained_forms & {_template_words(t) for t in relation.statements + relation.questions}
    rng = random.Random(5)
    for kind in ("plain", "plain_held_out"):
        for _ in range(200):
            keys = retrieval_samples.fact_keys(kind, 4, rng)
            assert len({k.split("|")[0] for k in keys}) == 1  # distractors share the relation
            fact = retrieval_samples.make_fact(kind, keys[0], rng)
            subject = "the " + keys[0].split("|")[1]
            assert fact.value in fact.statement and subject in fact.question.lower()
            assert fact.answer == fact.statement


def test_memorisation_check_tells_the_disguised_samples_from_the_files_as_they_are(toy_pipeline):
    import memorisation_check

    corpus = memorisation_check.CorpusText(toy_pipeline["corpus"], "train")
    tokenizer, split = toy_pipeline["tokenizer"], toy_pipeline["splits"]["train"]
    results = {}
    for fresh in (True, False):
        builder = task_samples.TaskSampleBuilder(split, tokenizer, fresh_names=fresh, code_sources=("fake-code",))
        results[fresh] = memorisation_check.measure_tasks(builder, corpus, tokenizer, 3, 6000, seed=0)
    for task in ("which_file", "where_function"):
        assert results[True][task]["answer_in_context"] == results[True][task]["samples"] > 0
        assert results[True][task]["answer_in_corpus"] == results[True][task]["fact_in_corpus"] == 0
        assert results[False][task]["fact_in_corpus"] > 0


def test_retrieval_batch_pads_and_weights(toy_pipeline):
    tokenizer = toy_pipeline["tokenizer"]
    builder = task_samples.TaskSampleBuilder(toy_pipeline["splits"]["train"], tokenizer)
    pad = tokenizer.special_tokens["[PAD]"]
    batch = train.retrieval_batch(builder, 2, 1024, random.Random(0), pad, [DEFAULT_SYSTEM_PROMPT])
    assert batch.input_ids.shape == batch.targets.shape == (2, 1024)
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
    assert batch.document_weights.sum() == 0  # the loss on task samples is the replies' only
    # Padding is never a target with weight.
    assert ((batch.targets == pad) & ((batch.answer_weights + batch.document_weights) > 0)).sum() == 0
    assert (batch.answer_weights.sum(1) > 0).all()


# -- a training run --------------------------------------------------------------------------------


def test_two_step_run_writes_a_checkpoint_the_engine_loads(toy_pipeline, tmp_path):
    out = tmp_path / "run"
    train.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--max-steps",
            "2",
            "--corpus",
            str(toy_pipeline["corpus"]),
            "--tokenizer",
            str(toy_pipeline["tokenizer_dir"]),
            "--out",
            str(out),
            "--lm-context",
            "64",
            "--retrieval-contexts",
            "512",
            "--batch-tokens",
            "512",
            "--micro-batch-tokens",
            "512",
            "--eval-lm-windows",
            "2",
            "--eval-retrieval-samples",
            "2",
        ]
    )
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "stage" in r]
    assert [r["stage"] for r in steps] == ["lm", "retrieval"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert any("eval" in r for r in records)
    assert (out / "loss_curve.csv").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2

    model = load_model(out / "model", dtype=torch.float32)
    tokenizer = load_tokenizer(out / "model")
    assert model.config.dtype == "bfloat16"
    assert model.config.eos_token_id == tokenizer.special_tokens["<|im_end|>"]
    assert model.config.vocab_size == tokenizer.vocab_size - 2
    assert {p.name for p in (out / "model").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    ids = torch.tensor([tokenizer.encode("def main():\n    return 0\n")])
    assert torch.isfinite(model(ids, model.new_state(1))).all()

    # The evaluation's two inference paths agree on the trained checkpoint.
    stream = toy_pipeline["splits"]["heldout"].lm_stream(tokenizer.special_tokens["[EOS]"])
    ppl = evaluate.heldout_perplexity(model, stream, tokens=200, context=100, chunk=32, token_by_token=40)
    assert abs(ppl["ppl_chunked_prefill_on_those"] / ppl["ppl_token_by_token"] - 1) < 1e-4


def test_loss_falls_over_a_few_steps_on_repeated_text(toy_pipeline):
    """The optimiser, schedule and forward learn: a few steps on one window fit it."""
    tokenizer = toy_pipeline["tokenizer"]
    specials = tokenizer.special_tokens
    config = train.demo_config(
        train_tokenizer.model_vocab_size(tokenizer),
        specials["[BOS]"],
        specials["<|im_end|>"],
        specials["[PAD]"],
        tiny=True,
    )
    model = train.init_model(config, seed=0, device="cpu")
    args = argparse.Namespace(
        weight_decay=0.0, lr=3e-3, grad_clip=1.0, balance_rate=1e-3, document_loss_weight=0.1, checkpoint_layers=False
    )
    trainer = train.Trainer(args, model, training_forward.chunk_kda_autograd, torch.device("cpu"))
    stream = toy_pipeline["splits"]["train"].lm_stream(specials["[EOS]"])
    batch = train.lm_batch(stream, 2, 64, torch.Generator().manual_seed(0))
    losses = [trainer.step([batch], lr=3e-3)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] - 0.5


def test_a_command_is_sometimes_a_usage_synopsis(monkeypatch):
    """A command fact planted as a usage synopsis (`tool sessions [list] | show ID | rm ID`): the asked
    subcommand in brackets with its plain verb, two to four others after it, no words saying what any
    does; the answer is the command without the brackets."""
    monkeypatch.setattr(retrieval_samples, "USAGE_SYNOPSIS_SHARE", 1.0)
    for seed in range(20):
        rng = random.Random(seed)
        key = retrieval_samples.fact_keys("command", 1, rng)[0]
        fact = retrieval_samples.make_fact("command", key, rng)
        tool, action, noun = key.split("|")
        verb = retrieval_samples._ACTIONS[action][1]
        assert fact.value == f"{tool} {noun} {verb}"
        assert fact.statement.startswith(f"{tool} {noun} [{verb}] | ") and "saved" not in fact.statement
        assert 2 <= fact.statement.count(" | ") <= 4
        assert fact.question == f"Which command {action} the saved {noun}?" and f"`{fact.value}`" in fact.answer
