"""Code spans held to the document: what an answer writes between backticks is a name the session read.

Answers name files, functions, settings and commands between backticks. The embedded demo model (22 M
parameters) finds the line that holds the answer but can garble the name it copies from there
(`LOBOR_BACKEND=torch` for the `HARBOR_BACKEND=torch` it read, a path one directory off): a name the
document does not hold is never the right answer to "which file" or "which variable". So the decode
loop (engine/generate.py) holds a span's tokens back while it is open, and once it closes asks
`rewrite`: a span that is a piece of whole words of the document stays as written; one that is not is
replaced by a name the document holds. The candidates: the piece of whole words nearest to it in edit
distance, when one is within a third of its length, and the document's own code spans that begin with
the span's first run of letters and digits (`KIMI_DEBUG=1` where README's table has `KIMI_DESK_DEBUG=1`,
`KIMI_DESK_KERNELS=torch`, ...: the model set out to copy one of the names of that family and lost its
way). With one candidate it is taken; with several, the model's own probability of writing each in the
span's place decides (the decode loop measures it from the state before the span). With none the span
stays: a guess that far off is not a garbled name. A span with a slash is a path and
names a file: the piece takes the extension the text gives the file (whole words stop at its dot), and
a path the text holds only cut before its extension becomes that file. The model then goes on from the
corrected span, as if it had written it.

Why after the span and not token by token: the model's first token says little about which name it
means (`LO...` for `HARBOR_BACKEND`), so holding each token to the document picks a wrong name from the
start; the whole span it wanted is the evidence to match.

Which models: the embedded one (session.py, `Assistant.copies_code_spans`). A large model may write new
code between backticks, which this would change.

    copy = CodeSpanCopy(tokenizer, text)        # the document (and the thread's questions: joined)
    copy.is_open(reply_ids)                     # whether the reply ends inside a span
    copy.rewrite(reply_ids, opened_at, likelihoods)   # ids in place of reply_ids[opened_at:], or None
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

# A span longer than this is code the model writes, not a name it copies: never rewritten.
MAX_SPAN_CHARS = 80
# A span found this many times only inside longer words is looked for no further.
MAX_OCCURRENCES = 4096
# The most names the model weighs for one span (the nearest in edit distance first).
MAX_CANDIDATES = 8

# What the document writes between backticks, within one line.
_CODE_SPAN = re.compile(rf"`([^`\n]{{1,{MAX_SPAN_CHARS}}})`")
_FIRST_RUN = re.compile(r"[^\W_]+")

# Each candidate's ids -> the model's log-probability of writing them where the span was.
Likelihoods = Callable[[list[list[int]]], list[float]]

_WORD_CHAR = re.compile(r"\w")
# What a path is made of: a rewritten path is widened to the whole of it (`_whole_path`).
_PATH_CHAR = re.compile(r"[\w./-]")
# A file's extensions after its name (".py", ".tar.gz"), where its path ends.
_EXTENSION = re.compile(r"(?:\.\w+)+(?![\w/-])")


def is_word_char(character: str) -> bool:
    return bool(_WORD_CHAR.match(character))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions, each 1."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


class CodeSpanCopy:
    """The names a reply to a document with text `text` may write between backticks."""

    def __init__(self, tokenizer, text: str):
        self.tokenizer = tokenizer
        self.text = text
        self.rewritten: list[tuple[str, str]] = []  # (the span as written, the piece it became), in order
        self._tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        self._code_spans: dict[str, list[str]] | None = None

    def joined(self, more: str) -> CodeSpanCopy:
        """This document and `more` (a thread's questions: names the user wrote count as read)."""
        return CodeSpanCopy(self.tokenizer, f"{self.text}\n{more}")

    def is_open(self, reply_ids: Sequence[int]) -> bool:
        return self.tokenizer.decode(list(reply_ids), skip_special_tokens=True).count("`") % 2 == 1

    def rewrite(
        self, reply_ids: Sequence[int], opened_at: int, likelihoods: Likelihoods | None = None
    ) -> list[int] | None:
        """The ids to put in place of reply_ids[opened_at:], where the token at `opened_at` opened a span
        that has since closed (or that the reply left open at its end: then it is closed here), when the
        span is not a piece of the document and a name of it may stand for the span (`candidates`);
        else None. Of several candidates, the one `likelihoods` (each candidate's ids -> the model's
        log-probability of writing them there) rates highest; without it, the nearest."""
        decode = self.tokenizer.decode
        before = decode(list(reply_ids[:opened_at]), skip_special_tokens=True)
        text = decode(list(reply_ids), skip_special_tokens=True)
        if not text.startswith(before) or "`" not in text[len(before) :]:
            return None
        opening = text.index("`", len(before))
        closing = text.find("`", opening + 1)
        span = text[opening + 1 : closing if closing >= 0 else len(text)]
        pieces = self.candidates(span) if likelihoods is not None else [p for p in [self.nearest(span)] if p]
        if not pieces:
            return None
        rest = text[closing:] if closing >= 0 else "`"
        options = [
            self.tokenizer.encode(text[len(before) : opening + 1] + piece + rest, allow_special=False)
            for piece in pieces
        ]
        choice = 0
        if len(options) > 1:
            scores = likelihoods(options)
            choice = max(range(len(options)), key=lambda i: (scores[i], -i))
        self.rewritten.append((span, pieces[choice]))
        return options[choice]

    def candidates(self, span: str) -> list[str]:
        """The names of the document `span` may stand for, nearest in edit distance first, at most
        MAX_CANDIDATES: the nearest piece of whole words (`nearest`), then the document's code spans
        that begin with the span's first run of letters and digits. Empty when the span is a piece of
        the document (a path it holds only cut short: that whole path alone) or far from every name."""
        if not span.strip() or len(span) > MAX_SPAN_CHARS:
            return []
        if self.holds(span):
            cut_short = self._file_cut_short(span) if "/" in span else None
            return [cut_short] if cut_short else []
        names = [piece for piece in [self._nearest_piece(span)] if piece]
        run = _FIRST_RUN.search(span)
        if run is not None:
            family = [name for name in self.code_spans().get(run.group(0), []) if name not in names]
            family.sort(key=lambda name: (edit_distance(span, name), name))
            names += family
        return names[:MAX_CANDIDATES]

    def code_spans(self) -> dict[str, list[str]]:
        """The text's code spans (what it writes between backticks, within a line), by their first run
        of letters and digits."""
        if self._code_spans is None:
            self._code_spans = {}
            for name in dict.fromkeys(match.group(1) for match in _CODE_SPAN.finditer(self.text)):
                run = _FIRST_RUN.search(name)
                if run is not None and name.strip() == name:
                    self._code_spans.setdefault(run.group(0), []).append(name)
        return self._code_spans

    def holds(self, piece: str) -> bool:
        """Whether `piece` is in the text as a piece of whole words: beginning where a word begins (or
        with a non-word character) and ending where one ends (or with one)."""
        text, size = self.text, len(piece)
        begins, ends = is_word_char(piece[0]), is_word_char(piece[-1])
        at = text.find(piece)
        for _ in range(MAX_OCCURRENCES):
            if at < 0:
                return False
            end = at + size
            if not (begins and at and is_word_char(text[at - 1])) and not (
                ends and end < len(text) and is_word_char(text[end])
            ):
                return True
            at = text.find(piece, at + 1)
        return False

    def nearest(self, span: str) -> str | None:
        """The piece of whole words of the text nearest to `span` (None: the span is one already, is
        empty or too long, or nothing is within a third of its length). The alignment that may start
        and end anywhere in the text (Sellers' algorithm) finds where the span fits best, one row of
        the text's length per character of the span; it never crosses a line break or a backtick (a
        name is within one line and one span). The piece is then widened to whole words."""
        if not span.strip() or len(span) > MAX_SPAN_CHARS:
            return None
        if self.holds(span):
            return self._file_cut_short(span) if "/" in span else None
        return self._nearest_piece(span)

    def _nearest_piece(self, span: str) -> str | None:
        """`nearest` for a span the text does not hold."""
        text, (codes, walls, offsets, far) = self.text, self._alignment_tables()
        distances = torch.zeros(len(text) + 1, dtype=torch.int64)  # a match may start anywhere: free
        for char in span:
            substituted = torch.full_like(distances, far)
            substituted[1:] = distances[:-1] + (codes != ord(char))
            substituted[walls] = far  # never consume a line break or a backtick
            best = torch.minimum(substituted, distances + 1)  # ... or the span's character left out
            # ... or text characters left out: d[j] = min over k <= j on the same line of best[k] + (j - k)
            distances = torch.cummin(best - offsets, 0).values + offsets
        end = int(torch.argmin(distances))
        limit = len(span) // 3
        if int(distances[end]) > limit:
            return None
        line_start = max(text.rfind("\n", 0, end), text.rfind("`", 0, end)) + 1
        start = min(
            range(max(line_start, end - len(span) - limit), max(line_start, end - len(span) + limit) + 1),
            key=lambda s: (edit_distance(span, text[s:end]), s),
        )
        while start > 0 and is_word_char(text[start]) and is_word_char(text[start - 1]):
            start -= 1
        while end < len(text) and is_word_char(text[end - 1]) and is_word_char(text[end]):
            end += 1
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        piece = self._as_many_words(span, start, end, limit)
        if not piece or "\n" in piece or "`" in piece or edit_distance(span, piece) > limit:
            return None
        if "/" in span and piece == text[start:end]:
            return self._whole_path(span, start, end, limit)
        return piece

    def _file_cut_short(self, span: str) -> str | None:
        """The file a path that the text holds only cut short names: "names/test/test_examples" where
        the text has "names/test/test_examples.py" and nothing else after it. None where the span also
        stands on its own (a directory, a name) or could be more than one file."""
        text, files = self.text, set()
        for match in re.finditer(re.escape(span), text):
            at = match.start()
            if at and _PATH_CHAR.match(text[at - 1]):
                continue
            extension = _EXTENSION.match(text, match.end())
            if extension is None:
                if match.end() == len(text) or not is_word_char(text[match.end()]):
                    return None  # the span itself, whole
                continue
            files.add(text[at : extension.end()])
            if len(files) > 1:
                return None
        return files.pop() if files else None

    def _whole_path(self, span: str, start: int, end: int, limit: int) -> str:
        """text[start:end] widened to the whole path the text holds there, for a span that names a path:
        "src/harbor/berthz" stands for the file `src/harbor/berths.py`, not for the piece cut before its
        extension. The extension is taken whatever its length (the name before it is what matched);
        the start is widened to where the path begins when that stays within `limit` of the span."""
        text = self.text
        extension = _EXTENSION.match(text, end)
        if extension is not None:
            end = extension.end()
        earlier = start
        while earlier > 0 and _PATH_CHAR.match(text[earlier - 1]):
            earlier -= 1
        return text[earlier:end] if edit_distance(span, text[earlier:end]) <= limit else text[start:end]

    def _as_many_words(self, span: str, start: int, end: int, limit: int) -> str:
        """text[start:end], or when the span has more words (split at spaces) than it, the same piece with
        the words before or after it on its line that make the count equal, where one is within `limit`
        of the span: "kimi-desk sessions db" means a command of three words, not the two it shares."""
        text, missing = self.text, len(span.split()) - len(self.text[start:end].split())
        if missing <= 0:
            return text[start:end]

        def word_edges(at: int, step: int, count: int) -> int | None:
            for _ in range(count):
                while 0 <= at + min(step, 0) < len(text) and text[at + min(step, 0)] in " \t":
                    at += step
                if not 0 <= at + min(step, 0) < len(text) or text[at + min(step, 0)] in "\n`":
                    return None
                while 0 <= at + min(step, 0) < len(text) and not text[at + min(step, 0)].isspace():
                    if text[at + min(step, 0)] == "`":
                        break
                    at += step
            return at

        best = text[start:end], limit + 1
        for before in range(missing + 1):
            first, last = word_edges(start, -1, before), word_edges(end, 1, missing - before)
            if first is not None and last is not None:
                distance = edit_distance(span, text[first:last])
                if distance < best[1]:
                    best = text[first:last], distance
        return best[0]

    def _alignment_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """For `nearest`, once per text: its characters as code points; per alignment position (0..len)
        whether it follows a line break or a backtick (a wall); each position plus its line (a wall
        starts one) lifted by `far`, more than any distance within one line, so that a running minimum
        over these never carries an alignment from one line into the next; and `far`."""
        if self._tables is None:
            codes = torch.frombuffer(bytearray(self.text.encode("utf-32-le")), dtype=torch.int32).to(torch.int64)
            walls = torch.cat([torch.zeros(1, dtype=torch.bool), (codes == ord("\n")) | (codes == ord("`"))])
            far = len(self.text) + MAX_SPAN_CHARS + 1
            offsets = torch.arange(len(self.text) + 1, dtype=torch.int64) + torch.cumsum(walls, 0) * far
            self._tables = (codes, walls, offsets, far)
        return self._tables
