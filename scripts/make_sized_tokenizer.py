"""Write a byte-level BPE tokenizer with exactly N ids, built programmatically (no training corpus, no download):
a stand-in for a tokenizer of a given size where only its size matters, such as a compile dry run's student
vocabulary (Llama-3's 128,256 ids: 128,000 BPE tokens and 256 special tokens).

    python scripts/make_sized_tokenizer.py OUT_DIR [--vocab-size 128256] [--special 256]

The BPE tokens are the 256 byte-level symbols, then every pair of them (65,536), then as many triples (a pair and a
symbol) as fill the regular ids, each with its merge, so any text encodes; the special tokens come last:
`<|begin_of_text|>`, `<|end_of_text|>`, then `<|reserved_special_token_K|>`. `tokenizer_config.json` names the
first two as `bos_token` and `eos_token`. The same arguments write the same files.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def sized_tokenizer(vocab_size: int, special: int = 256) -> Tokenizer:
    """A byte-level BPE of exactly `vocab_size` ids, the last `special` of them special tokens (see the module
    docstring)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    regular = vocab_size - special
    if special < 2 or regular < len(alphabet):
        raise SystemExit(f"--vocab-size {vocab_size} with --special {special}: needs at least 2 special tokens and "
                         f"{len(alphabet)} regular ones")
    vocab = {s: i for i, s in enumerate(alphabet)}
    merges = []
    pairs = ((a, b) for a, b in itertools.product(alphabet, repeat=2))
    triples = ((a + b, c) for a, b, c in itertools.product(alphabet, repeat=3))
    for left, right in itertools.chain(pairs, triples):
        if len(vocab) == regular:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{k}|>" for k in range(special - 2)]
    tok.add_special_tokens(names)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--vocab-size", type=int, default=128_256)
    parser.add_argument("--special", type=int, default=256)
    args = parser.parse_args()
    tok = sized_tokenizer(args.vocab_size, args.special)
    size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    assert size == args.vocab_size, (size, args.vocab_size)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{out / 'tokenizer.json'}: {size:,} ids ({args.special} special)")


if __name__ == "__main__":
    main()
