"""A real `CLIPTokenizer` for the toy world: every toy word is one token, any other text still
tokenizes (byte-level fallback), so the stock `StableDiffusionPipeline` encodes prompts unchanged.

The vocabulary is the 256 byte symbols (plain and word-final `</w>`) plus one token per toy word;
merges are built so BPE assembles each toy word into its single token. transformers 5 ignores
`CLIPTokenizer(vocab_file=..., merges_file=...)`, so the files are written to a folder and read
with `from_pretrained`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from deradiff.toy.domain import VOCABULARY

MAX_LENGTH = 16  # longest caption is 8 words + <|startoftext|> + <|endoftext|>; room for variants
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")  # ids 0 and 1: text encoder bos/eos/pad


def _byte_symbols() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word (last symbol carries `</w>`)."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts[:-1], parts[1:], strict=True))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
    return parts


def toy_vocab_and_merges(words: tuple[str, ...] = VOCABULARY) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) such that each of `words` is a single token.

    Merges chain each word left to right; a word that an earlier chain splits differently gets
    extra merges appended (a higher rank, so they never disturb words already resolved).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in _byte_symbols():
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def add(a: str, b: str) -> None:
        if (a, b) not in ranks:
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))

    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        acc = parts[0]
        for nxt in parts[1:]:
            add(acc, nxt)
            acc += nxt
    for _ in range(len(words)):  # repair: converges in a few rounds
        broken = [w for w in words if len(_bpe(w, ranks)) > 1]
        if not broken:
            break
        for word in broken:
            parts = _bpe(word, ranks)
            acc = parts[0]
            for nxt in parts[1:]:
                add(acc, nxt)
                acc += nxt
    return vocab, [f"{a} {b}" for a, b in merges]


def write_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json and merges.txt for the toy vocabulary into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = toy_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def build_toy_tokenizer():
    """A `CLIPTokenizer` (max length MAX_LENGTH) whose vocabulary covers the toy captions."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp)
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_LENGTH, pad_token="<|endoftext|>")
    expected = len(toy_vocab_and_merges()[0])
    if len(tok) != expected:  # the transformers-5 trap: files silently ignored
        raise RuntimeError(f"CLIPTokenizer read {len(tok)} tokens instead of {expected} from its files")
    return tok


def vocab_size() -> int:
    return len(toy_vocab_and_merges()[0])
