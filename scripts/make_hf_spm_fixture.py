#!/usr/bin/env python3
"""Generates kiln-bpe's SentencePiece-style `tokenizer.json` fixture with Hugging Face `tokenizers`.

The tokenizer has the form `transformers` gives Llama 2, Mistral, Phi-3 and Gemma: a BPE model with
`byte_fallback`, a normalizer that prepends `▁` and writes spaces as `▁`, no pre-tokenizer, the
256 `<0xXX>` byte tokens in the vocabulary and only `<unk>`, `<s>`, `</s>` as added tokens. It is
trained on the first 200 kB of tinyshakespeare (vocabulary 600) and `tokenizers` encodes the test
strings; writes crates/bpe/tests/data/hf_spm/{tokenizer.json,expected.json}.

Usage: python3 scripts/make_hf_spm_fixture.py [../shared/data/tinyshakespeare.txt]   (needs tokenizers)
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "bpe" / "tests" / "data" / "hf_spm"
CASES = ["Hello world", "  two  spaces", "Quick note:\nBefore we begin, listen closely.",
         "café ünïcödé 🦀 中文", "<s> a </s> b", "x", "", "tab\there\n\nnewlines  ",
         "<0x41> stays text"]


def main() -> None:
    corpus = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    text = corpus.read_text()[:200_000]
    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                  limit_alphabet=100)
    tok.train_from_iterator([line for line in text.split("\n") if line], trainer)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "tokenizer.json"
    tok.save(str(path))
    # As in Llama 2's file: byte tokens live in the vocabulary; only <unk>, <s>, </s> are added.
    j = json.loads(path.read_text())
    j["added_tokens"] = [t for t in j["added_tokens"] if not t["content"].startswith("<0x")]
    path.write_text(json.dumps(j, ensure_ascii=False))
    tok = Tokenizer.from_file(str(path))
    out = [{"text": c, "ids": tok.encode(c, add_special_tokens=False).ids} for c in CASES]
    (OUT / "expected.json").write_text(json.dumps(out, ensure_ascii=False, indent=0))
    print(f"wrote {path} ({path.stat().st_size} bytes) and expected.json ({len(out)} cases)")


if __name__ == "__main__":
    main()
