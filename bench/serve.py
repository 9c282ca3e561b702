"""Serving many adapters over one int8 base (issue 30, item 3): `lora-dist serve` with K = 1, 4
and 16 adapters, measured through the `openai` client.

Adapters: K short real jobs on SmolLM2-135M (the main job, jobs/smollm2-e2e.yaml, through
`train_local` as `lora-dist train` runs it: 3 steps of 2 rows of at most 48 tokens, seed i, lr
cycling 2e-3/4e-3/8e-3, so they differ), trained once into ``--cache`` and reused by later runs.

For each K, one `lora-dist serve` process (a fresh port, a bearer token in a temporary file,
``--max-adapters K`` so none is evicted):
  * an adapter's first request (verify + load, then the request) against the same request warm,
    each at max_tokens 1 so the load is not hidden behind the decode; and the replica's own
    adapter_load_seconds (GET /lora-dist/stats);
  * bounded load: ``--requests`` completions at each ``--concurrency`` (threads sharing one
    client), request j for adapter j mod K and the j-th E2E meaning representation of
    jobs/data/e2e/devset.csv, greedy, ``--max-tokens``: requests/s, p50 and p99 latency (p99 by
    linear interpolation: with 16 requests it is nearly the slowest), generated tokens/s (usage);
  * the replica's resident memory (stats' rss_bytes) with all K adapters loaded, and at the end.

Memory is compared with K merged float models: K x the resident memory one SmolLM2 float32
model adds to a process that has imported torch and transformers, after a 4-token generate
(measured in a subprocess; the runtime each would need besides is not counted, which favours
the merged side).

Every served text is checked against `lora-dist generate`'s once that K's server has stopped
(lora_dist.generate: the base built once with load_adapted, each adapter's pairs copied into
it, each prompt alone through its template, greedy; each (adapter, prompt) generated once).

    python bench/serve.py [--adapters 1 4 16] [--concurrency 1 4 16] [--requests 16]
                          [--max-tokens 16] [--cache DIR] [--json FILE]

On the shared 2-core development machine `--adapters 1 16 --max-tokens 8 --concurrency 1 16` took
18 minutes (load average 5-8); training the 16 adapters the first time takes 10-20 s each on an
idle machine, minutes each on a loaded one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
JOB = REPO / "jobs" / "smollm2-e2e.yaml"
LRS = (2e-3, 4e-3, 8e-3)
GIB = 1 << 30


def adapter_sets(i: int) -> list[str]:
    return ["train.max_steps=3", "data.max_length=48", "train.micro_batch_size=2", "train.warmup_steps=1",
            "train.eval_batches=1", f"train.seed={i}", f"train.lr={LRS[i % len(LRS)]}", f"data.path={DATA}"]


def adapters(k: int, cache: Path) -> list[Path]:
    """The first ``k`` adapters, trained into ``cache`` unless they are there already."""
    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    paths = []
    for i in range(k):
        out = cache / f"a{i:02d}-seed{i}-lr{LRS[i % len(LRS)]:g}"
        found = sorted(p.parent for p in out.glob("*/manifest.json"))
        if not found:
            t0 = time.time()
            print(f"training adapter {i + 1}/{k} into {out} ...", end=" ", flush=True)
            with open(os.devnull, "w") as quiet:
                found = [Path(train_local(load_spec(JOB, [*adapter_sets(i), f"output.dir={out}"]), stream=quiet))]
            print(f"{time.time() - t0:.0f} s", flush=True)
        paths.append(found[-1])
    return paths


def meaning_representations(n: int) -> list[str]:
    """``n`` distinct MRs spread over the devset (in file order)."""
    with open(DATA, newline="") as f:
        mrs = list(dict.fromkeys(row["mr"] for row in csv.DictReader(f)))
    step = max(1, len(mrs) // n)
    return [mrs[(j * step) % len(mrs)] for j in range(n)]


class ServeDidNotStart(SystemExit):
    pass


class Server:
    """One `lora-dist serve` process with these adapters, aliased a00, a01, ..."""

    def __init__(self, paths: list[Path], tmp: Path, max_batch: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.token = secrets.token_hex(16)
        (tmp / "token").write_text(self.token)
        self.log = tmp / f"serve-{len(paths)}.log"
        cmd = [str(Path(sys.executable).parent / "lora-dist"), "serve",
               *[f"a{i:02d}={p}" for i, p in enumerate(paths)], "--port", str(self.port),
               "--token-file", str(tmp / "token"), "--max-adapters", str(len(paths)),
               "--max-batch-size", str(max_batch)]
        t0 = time.time()
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:  # stdout until the ready line (or the end, if serve exits)
            for line in self.proc.stdout:
                lines.append(line)
                if line.startswith("serving"):
                    ready.set()
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=600)  # ends at the ready line, or when serve exits
        if not ready.is_set():
            self.stop()
            raise ServeDidNotStart(f"error: lora-dist serve did not start (exit {self.proc.returncode}); its stdout:\n"
                             f"{''.join(lines)[-2000:]}\nits stderr ({self.log}):\n{self.log.read_text()[-3000:]}")
        self.start_seconds = time.time() - t0
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        req = urllib.request.Request(self.url + "/lora-dist/stats", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            (base,) = json.load(r).values()
        return base

    def stop(self) -> None:
        """SIGINT, as Ctrl-C: the server shuts its Serve and Ray down itself."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(timeout=60)


def complete(client, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return {"model": model, "prompt": prompt, "text": r.choices[0].text, "tokens": r.usage.completion_tokens,
            "seconds": time.perf_counter() - t0}


def load(client, k: int, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[dict, list[dict]]:
    jobs = [(f"a{j % k:02d}", p) for j, p in enumerate(prompts)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = [{**d, "concurrency": concurrency} for d in pool.map(lambda job: complete(client, *job, max_tokens), jobs)]
    wall = time.perf_counter() - t0
    lat = sorted(d["seconds"] for d in done)
    row = {"adapters": k, "concurrency": concurrency, "requests": len(done), "seconds": round(wall, 2),
           "requests_per_s": len(done) / wall, "p50_s": statistics.median(lat), "p99_s": percentile(lat, 99),
           "tokens_per_s": sum(d["tokens"] for d in done) / wall, "loadavg": os.getloadavg()[0]}
    return row, done


def percentile(sorted_values: list[float], q: float) -> float:
    x = (len(sorted_values) - 1) * q / 100
    lo = int(x)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (x - lo)


def serve_k(paths: list[Path], args, prompts: list[str]) -> tuple[dict, list[dict]]:
    """One server with these adapters: first vs warm request, memory, the load at each concurrency."""
    import openai

    k = len(paths)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            server = Server(paths, Path(tmp), max(args.concurrency))
        except ServeDidNotStart as e:  # on a loaded machine Ray Serve's proxy may miss its 60 s start limit
            print(f"K={k}: {e}\nK={k}: starting lora-dist serve again", flush=True)
            server = Server(paths, Path(tmp), max(args.concurrency))
        try:
            print(f"K={k}: serving after {server.start_seconds:.0f} s on port {server.port}", flush=True)
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.token, max_retries=0, timeout=900)
            complete(client, "smollm2-135m", prompts[0], 1)  # the replica's own first request (no adapter)
            first, warm = [], []
            for i in range(k):
                first.append(complete(client, f"a{i:02d}", prompts[0], 1)["seconds"])
                warm.append(complete(client, f"a{i:02d}", prompts[0], 1)["seconds"])
            loaded = server.stats()
            result = {"adapters": k, "start_s": round(server.start_seconds, 1), "first_s": first, "warm_s": warm,
                      "adapter_load_s": loaded["adapter_load_seconds"], "rss_loaded": loaded["rss_bytes"], "load": []}
            print(f"K={k}: first request {statistics.median(first):.3f} s, warm {statistics.median(warm):.3f} s "
                  f"(median, max_tokens 1); replica RSS {loaded['rss_bytes'] / GIB:.2f} GiB", flush=True)
            responses = []
            for c in args.concurrency:
                row, done = load(client, k, prompts, c, args.max_tokens)
                result["load"].append(row)
                responses += done
                print(f"K={k} concurrency {c}: {row['requests_per_s']:.3f} req/s, p50 {row['p50_s']:.2f} s, p99 "
                      f"{row['p99_s']:.2f} s, {row['tokens_per_s']:.1f} tok/s (load average {row['loadavg']:.1f})", flush=True)
            result["rss_end"] = server.stats()["rss_bytes"]
        finally:
            server.stop()
    return result, responses


def merged_float_rss() -> dict:
    """The resident memory one merged float32 SmolLM2-135M adds to a process (transformers), after
    a short greedy generate."""
    code = """if True:
        import json, os, torch, transformers
        from lora_dist.base import resolve_base
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        path = resolve_base("smollm2-135m")
        before = rss()
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():  # the weights are mapped from the file: resident once a forward has read them
            m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
        print(json.dumps({"rss_delta": rss() - before, "fp32_bytes": sum(p.numel() * 4 for p in m.parameters())}))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(responses: list[dict], paths: dict[str, Path], max_tokens: int, want: dict[tuple[str, str], str],
          held: dict) -> list[dict]:
    """Each (adapter, prompt) not in ``want`` yet generated as `lora-dist generate` does (into
    ``want``); returns the responses that differ from it.

    The base is built once (``held``): an adapter with the same LoRA settings is copied into its
    LoRA modules (adapter.load_into, as load_adapted does after building), where `generate` would
    build the base again for each call.
    """
    from lora_dist.adapter import load_adapted, load_into, read_lora_tensors
    from lora_dist.generate import format_prompt, generate, stop_ids, uses_bos
    from lora_dist.store import verify_artifact

    for name in sorted({r["model"] for r in responses}):
        prompts = sorted({r["prompt"] for r in responses if r["model"] == name} - {p for n, p in want if n == name})
        if not prompts:
            continue
        manifest = verify_artifact(paths[name])
        key = (json.dumps(manifest.spec["lora"], sort_keys=True), manifest.quantization)
        if held.get("key") != key:
            held.clear()
            held.update(key=key, loaded=load_adapted(paths[name])[0])
        else:
            load_into(held["loaded"].model, read_lora_tensors(paths[name]))
        model, tok = held["loaded"].model, held["loaded"].tokenizer
        for prompt in prompts:
            want[name, prompt] = generate(model, tok, [format_prompt(manifest, prompt)], max_new_tokens=max_tokens,
                                          bos=uses_bos(manifest), stop=stop_ids(manifest, tok))[0]
    return [{**r, "generate": want[r["model"], r["prompt"]]} for r in responses if r["text"] != want[r["model"], r["prompt"]]]


def report(results: list[dict], merged: dict, matched: int, total: int, bad: list[dict], args) -> dict:
    one = {row["concurrency"]: row["requests_per_s"] for r in results if r["adapters"] == 1 for row in r["load"]}
    print(f"\n{args.requests} requests per row, max_tokens {args.max_tokens}, greedy; round-robin over the K adapters; "
          f"load avg: the machine's 1-minute load average after the row (2 cores)\n")
    print("| adapters | concurrency | requests/s | p50 s | p99 s | generated tok/s | req/s vs 1 adapter | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for row in r["load"]:
            vs = f"{row['requests_per_s'] / one[row['concurrency']]:.2f}x" if row["concurrency"] in one else "-"
            print(f"| {r['adapters']} | {row['concurrency']} | {row['requests_per_s']:.3f} | {row['p50_s']:.2f} | "
                  f"{row['p99_s']:.2f} | {row['tokens_per_s']:.1f} | {vs} | {row['loadavg']:.1f} |")
    rss1 = next((r["rss_end"] for r in results if r["adapters"] == 1), None)
    print("\n| adapters | replica RSS, K loaded | replica RSS, end | K merged float models | vs 1 adapter | "
          "first request s | warm s | adapter load s (median / max) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        loads = sorted(r["adapter_load_s"].values())
        vs = f"{r['rss_end'] / rss1:.2f}x" if rss1 else "-"
        print(f"| {r['adapters']} | {r['rss_loaded'] / GIB:.2f} GiB | {r['rss_end'] / GIB:.2f} GiB | "
              f"{r['adapters'] * merged['rss_delta'] / GIB:.2f} GiB | {vs} | {statistics.median(r['first_s']):.3f} | "
              f"{statistics.median(r['warm_s']):.3f} | {statistics.median(loads):.3f} / {loads[-1]:.3f} |")
    print(f"\none merged float32 model: +{merged['rss_delta'] / GIB:.3f} GiB resident ({merged['fp32_bytes'] / GIB:.3f} "
          f"GiB of fp32 parameters); first/warm: median over the K adapters, max_tokens 1")
    print(f"\nequal to lora-dist generate: {matched} of {total}")
    for b in bad:
        print(f"  MISMATCH {b['model']} {b['prompt']!r}: served {b['text']!r}, generate {b['generate']!r}")
    goals = {}
    top = max(r["adapters"] for r in results)
    last = next(r for r in results if r["adapters"] == top)
    if rss1 and top > 1:
        ratio = last["rss_end"] / rss1
        goals["memory"] = {"ratio": ratio, "met": ratio <= 1.2}
        print(f"goal: {top} adapters in at most 1.2x the memory of one: {ratio:.2f}x, "
              f"{'met' if ratio <= 1.2 else 'MISSED'}")
    if one and top > 1:
        ratios = {row["concurrency"]: row["requests_per_s"] / one[row["concurrency"]]
                  for row in last["load"] if row["concurrency"] in one}
        met = all(v >= 0.8 for v in ratios.values())
        goals["throughput"] = {"ratios": ratios, "met": met}
        print(f"goal: warm requests/s with {top} adapters at least 0.8x one's: "
              + ", ".join(f"{v:.2f}x at concurrency {c}" for c, v in ratios.items()) + f", {'met' if met else 'MISSED'}")
    return goals


def main() -> None:
    from lora_dist.store import cache_root

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16], help="K values (default 1 4 16)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="(default 1 4 16)")
    ap.add_argument("--requests", type=int, default=16, help="requests per (K, concurrency) (default 16)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    ap.add_argument("--cache", type=Path, default=cache_root() / "bench" / "serve-adapters",
                    help="where the adapters are trained once and reused (default: <lora-dist cache>/bench/serve-adapters)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure and response here")
    args = ap.parse_args()
    if min(args.adapters + args.concurrency + [args.requests, args.max_tokens]) < 1:
        ap.error("--adapters, --concurrency, --requests and --max-tokens must be at least 1")

    t0 = time.time()
    paths = adapters(max(args.adapters), args.cache)
    prompts = meaning_representations(args.requests)
    results, responses = [], []

    def save(**more) -> None:  # after each K too: a long run that is cut short keeps what it measured
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()},
                                             "results": results, "responses": responses, **more}, indent=1))

    want: dict[tuple[str, str], str] = {}
    held: dict = {}  # the reference model, built once
    bad: list[dict] = []
    for k in sorted(args.adapters):
        result, done = serve_k(paths[:k], args, prompts)
        results.append(result)
        done = [{**d, "adapters": k} for d in done]
        t1 = time.time()
        bad += check(done, {f"a{i:02d}": p for i, p in enumerate(paths)}, args.max_tokens, want, held)
        responses += done
        print(f"K={k}: checked against generate in {time.time() - t1:.0f} s: {len(responses) - len(bad)} of "
              f"{len(responses)} equal so far", flush=True)
        save(mismatches=bad)
    merged = merged_float_rss()
    matched = len(responses) - len(bad)
    goals = report(results, merged, matched, len(responses), bad, args)
    print(f"\n{time.time() - t0:.0f} s in all")
    save(merged_float=merged, matched=matched, total=len(responses), mismatches=bad, goals=goals)


if __name__ == "__main__":
    main()
