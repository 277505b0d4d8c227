"""Code spans copied from the document: what an answer writes between backticks is held to text the
session read.

Answers name files, functions, settings and commands between backticks. The embedded demo model (22 M
parameters) finds the line that holds the answer but can garble the name it copies from there
(`LOBOR_BACKEND` for the `HARBOR_BACKEND` it read, a path one directory off): a name that the document
does not hold is never the right answer to "which file" or "which variable". So while a span is open
the next token is chosen among those that keep the span a piece of the document's text, closing it
stays allowed, and so do the stop tokens; a token that opens a span with text of its own ("`HAR") is
allowed only when the document holds that text. The model's own logits choose among the tokens left,
greedy or sampled as asked.

Which models: the embedded one (session.py, `Assistant.copies_code_spans`). A large model may write new
code between backticks, which this would forbid.

    vocabulary = SpanVocabulary(tokenizer, stop_ids)       # once per tokenizer
    copy = CodeSpanCopy(vocabulary, text)                  # once per document
    copy.allowed(reply_ids)     # None when any token may come next, else the ids that may
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# A short span can occur thousands of times in a long document: the continuations looked at are those
# of its first occurrences, enough for every token that can follow it in practice.
MAX_OCCURRENCES = 4096


class SpanVocabulary:
    """The tokens by what they do to a span. Inside one: a token without a backtick continues it with
    its text, one with a single backtick continues it with the text before (its "head") and closes it;
    tokens with more backticks are not used there. Outside: a token with an odd number of backticks
    opens a span with the text after its last one (its "tail")."""

    def __init__(self, tokenizer, stop_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.size = tokenizer.vocab_size
        self.by_head: dict[str, list[int]] = {}  # head -> tokens continuing a span with it
        self.closing: list[int] = []  # a single backtick first: they close a span as it is
        self.opening: list[tuple[int, str]] = []  # (token, tail): tokens that open a span with text
        for token in range(self.size):
            text = tokenizer.decode([token], skip_special_tokens=True)
            if not text or "\ufffd" in text:  # special tokens, and bytes of a character cut in two
                continue
            ticks = text.count("`")
            if ticks <= 1:
                head = text.split("`", 1)[0]
                if head:
                    self.by_head.setdefault(head, []).append(token)
                elif ticks:
                    self.closing.append(token)
            if ticks % 2 and text.rsplit("`", 1)[1]:
                self.opening.append((token, text.rsplit("`", 1)[1]))
        self.longest = max(map(len, self.by_head), default=0)
        # Every beginning of a head: a text that is not one begins no head, so a look-up can stop there.
        self.head_prefixes = {head[:n] for head in self.by_head for n in range(1, len(head) + 1)}
        self.stops = sorted(set(stop_ids))


class CodeSpanCopy:
    """The tokens that may come next in a reply to a document with text `text`."""

    def __init__(self, vocabulary: SpanVocabulary, text: str, base: CodeSpanCopy | None = None):
        self.vocabulary = vocabulary
        self.text = text
        self._base = base  # the copy whose text this one's begins with, and whose span starts it reuses
        self._starts: list[int] | None = None
        self._outside: list[int] | None = None

    def joined(self, more: str) -> CodeSpanCopy:
        """This document and `more` (a thread's questions): the document's span starts, once found, are
        kept, not found again."""
        return CodeSpanCopy(self.vocabulary, f"{self.text}\n{more}", base=self)

    def allowed(self, reply_ids: Sequence[int]) -> list[int] | None:
        """The tokens that may come after the reply so far (None: any): inside an open span those that
        keep it a piece of the document or close it, and the stop tokens; outside, all but the tokens
        that would open a span with text the document does not hold."""
        reply = self.vocabulary.tokenizer.decode(list(reply_ids), skip_special_tokens=True)
        if reply.count("`") % 2 == 0:
            return self._outside_span()
        span = reply[reply.rindex("`") + 1 :]
        tokens = self._continuing(span) + self.vocabulary.closing if span else self._span_starts()
        return tokens + self.vocabulary.stops if tokens else None

    def _outside_span(self) -> list[int] | None:
        if self._outside is None:
            barred = {t for t, tail in self.vocabulary.opening if tail not in self.text}
            self._outside = [t for t in range(self.vocabulary.size) if t not in barred] if barred else []
        return self._outside or None

    def _span_starts(self) -> list[int]:
        """The first token of a span: one whose head occurs anywhere in the document. Found when a reply
        first opens an empty span, not before the first token: a search of the whole text for each head
        (seconds on a long document); a joined copy reuses its document's."""
        if self._starts is None:
            if self._base is None:
                found = (ids for head, ids in self.vocabulary.by_head.items() if head in self.text)
            else:
                # What the base does not hold: the added text, with the base's last characters before
                # it for the heads that cross from one into the other.
                more = self.text[max(0, len(self._base.text) - self.vocabulary.longest + 1) :]
                found = [self._base._span_starts()]
                found += [ids for head, ids in self.vocabulary.by_head.items() if head in more]
            self._starts = sorted({token for ids in found for token in ids})
        return self._starts

    def _continuing(self, span: str) -> list[int]:
        """The tokens whose head continues `span` where the document holds it."""
        longest, text = self.vocabulary.longest, self.text
        following: set[str] = set()
        start = text.find(span)
        for _ in range(MAX_OCCURRENCES):
            if start < 0:
                break
            end = start + len(span)
            following.add(text[end : end + longest])
            start = text.find(span, start + 1)
        by_head, prefixes = self.vocabulary.by_head, self.vocabulary.head_prefixes
        tokens: set[int] = set()
        for after in following:
            for length in range(1, len(after) + 1):
                piece = after[:length]
                if piece not in prefixes:
                    break
                tokens.update(by_head.get(piece, ()))
        return sorted(tokens)
