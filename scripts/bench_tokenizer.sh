#!/usr/bin/env bash
# Tokenizer speed and memory, Kiln against HF `tokenizers` and `tiktoken`, in the same session.
#
#   scripts/bench_tokenizer.sh            # RUNS=5 SHARED=../shared by default
#
# Encode: one thread, GPT-2 vocabulary, documents split on blank lines, median of RUNS after one
# warm-up (the protocol of ../shared/peers/tokenizer_peer.py). Train: vocab 8192 on the corpus.
# Memory: peak RSS of training on a corpus ~10x tinyshakespeare (Shakespeare + WikiText-2 + Rust
# sources of Kiln's dependencies). Prints every measurement, then the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
RUNS=${RUNS:-5}
LOG=$(mktemp)
python3 -c "import tokenizers, tiktoken" 2>/dev/null || python3 -m pip install -q tokenizers tiktoken
cargo build --release --quiet --example tokenizer_throughput --bin kiln

for corpus in "$SHARED/data/tinyshakespeare.txt" "$SHARED/data/wikitext-2/valid.txt"; do
  name=$(basename "$corpus" .txt)
  {
    python3 "$SHARED/peers/tokenizer_peer.py" encode "$corpus" --runs "$RUNS"
    target/release/examples/tokenizer_throughput encode "$corpus" --runs "$RUNS"
    python3 "$SHARED/peers/tokenizer_peer.py" train "$corpus" --runs "$RUNS"
    target/release/examples/tokenizer_throughput train "$corpus" --runs "$RUNS"
  } | sed "s/^/corpus=$name /" | tee -a "$LOG"
done

# A corpus ~10x tinyshakespeare with a realistic vocabulary (not one text repeated).
BIG=$(mktemp --suffix=.txt)
python3 - "$SHARED" "$BIG" <<'PY'
import glob, os, sys
shared, out = sys.argv[1], sys.argv[2]
target = 10 * os.path.getsize(f"{shared}/data/tinyshakespeare.txt")
parts = [f"{shared}/data/tinyshakespeare.txt", f"{shared}/data/wikitext-2/valid.txt", f"{shared}/data/wikitext-2/test.txt"]
parts += sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/*/src/**/*.rs"), recursive=True))
size = 0
with open(out, "wb") as f:
    for p in parts:
        if size >= target:
            break
        data = open(p, "rb").read()
        f.write(data + b"\n")
        size += len(data) + 1
print(f"big corpus: {size / 1e6:.1f} MB")
PY
# Peak RSS of one command, measured by a fresh Python parent that runs nothing else.
peak() {
  python3 -c 'import resource, subprocess, sys, time
t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"seconds={time.perf_counter() - t:.3f} peak_rss_mb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f}")' "$@"
}
echo "corpus=big10x peer=kiln task=train_memory $(peak target/release/kiln tokenizer train --vocab-size 8192 -o "$BIG.tokenizer.json" "$BIG")" | tee -a "$LOG"
echo "corpus=big10x peer=hf-tokenizers task=train_memory $(peak python3 "$SHARED/peers/tokenizer_peer.py" train "$BIG" --runs 1)" | tee -a "$LOG"
rm -f "$BIG" "$BIG.tokenizer.json"

python3 - "$LOG" <<'PY'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    if "peer" in kv and "task" in kv:
        rows[(kv["corpus"], kv["peer"], kv["task"])] = kv
print("\nratios (higher is better for Kiln):")
for corpus in ["tinyshakespeare", "valid"]:
    def mbps(peer, task):
        return float(rows[(corpus, peer, task)]["mb_per_s"])
    print(f"  {corpus}: encode 1 thread  kiln/tiktoken = {mbps('kiln', 'encode_1thread') / mbps('tiktoken', 'encode_1thread'):.2f}x"
          f"  (cold cache {mbps('kiln', 'encode_1thread_cold') / mbps('tiktoken', 'encode_1thread'):.2f}x,"
          f" kiln/hf = {mbps('kiln', 'encode_1thread') / mbps('hf-tokenizers', 'encode_1thread'):.2f}x)")
    batch = [t for (c, p, t) in rows if c == corpus and p == "kiln" and t.startswith("encode_batch")][0]
    print(f"  {corpus}: encode batch     kiln/tiktoken = {mbps('kiln', batch) / mbps('tiktoken', batch):.2f}x")
    print(f"  {corpus}: train vocab 8192 kiln/hf       = {mbps('kiln', 'train') / mbps('hf-tokenizers', 'train'):.2f}x")
k, h = rows.get(("big10x", "kiln", "train_memory")), rows.get(("big10x", "hf-tokenizers", "train_memory"))
if k and h:
    print(f"  big10x: train peak RSS kiln {k['peak_rss_mb']} MB vs hf {h['peak_rss_mb']} MB")
PY
rm -f "$LOG"
