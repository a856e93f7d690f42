"""Python's HF `tokenizers` loads a tokenizer.json that `kiln tokenizer train` wrote and produces
the same ids as `kiln tokenizer encode`, for each pre-tokenizer Kiln trains.

    python tests/python/check_hf_compat.py target/release/kiln CORPUS
"""
import os, subprocess, sys, tempfile

from tokenizers import Tokenizer

SAMPLES = [
    "Hello world", " leading space", "I'm here; you're there. They'll've gone!",
    "中文分词测试：你好，世界！", "emoji 🦙🦀 👩‍👩‍👧‍👦", "e\u0301 combining", "numbers 1234567 ½",
    "tabs\t\tand   spaces\n\n\nnewlines", "<|endoftext|> special", "",
]


def main():
    kiln, corpus = sys.argv[1], sys.argv[2]
    checked = 0
    with tempfile.TemporaryDirectory() as tmp:
        for pre in ["gpt2", "cl100k", "none"]:
            path = os.path.join(tmp, f"{pre}.json")
            subprocess.run([kiln, "tokenizer", "train", "--vocab-size", "1000", "--pre-tokenizer", pre,
                            "--output", path, corpus], check=True, capture_output=True)
            hf = Tokenizer.from_file(path)
            for text in SAMPLES:
                out = subprocess.run([kiln, "tokenizer", "encode", "--special", "--tokenizer", path],
                                     input=text.encode(), check=True, capture_output=True).stdout
                ours = [int(x) for x in out.split()]
                theirs = hf.encode(text, add_special_tokens=False).ids
                assert ours == theirs, f"{pre}: {text!r}: kiln {ours} != hf {theirs}"
                assert hf.decode(theirs, skip_special_tokens=False) == text, f"{pre}: HF decode of {text!r}"
                checked += 1
    print(f"{checked} passed, 0 failed")


if __name__ == "__main__":
    main()
