"""The server's overhead: tokens/s of a request served by ``wina serve`` against ``wina generate``'s, same machine.

Both run the same decode loop (``wina_convert.generate``); what the server adds is HTTP, JSON, the request's
tokenization and chat template, the hop to its decode thread, and (streaming) one server-sent event per token.

1. The checkpoint: ``--checkpoint PATH``, else SmolLM2-135M-Instruct converted by ``wina convert`` (defaults)
   at ``--sparsity`` into ``$WINA_CACHE/smollm2-wina-serve-bench`` (reused when it is there).
2. ``wina generate``: the function the command runs (``generate.generate`` after ``prompt_ids(chat=True)``,
   on a model from ``wina_convert.load``), in this process, timed from the prompt's token ids to the text.
3. ``wina serve``: the real command in a subprocess (its own copy of the model), on a free loopback port;
   each request is timed by the client, from sending it to the last byte (non-streaming) or to ``[DONE]``
   (streaming), so it includes tokenization and the chat template, which step 2 leaves out.
4. ``--repeats`` rounds after one warm-up each; in every round the three are run back to back (generate,
   served, served streaming), so drifts of the machine's load fall on all three alike. Medians are reported.
   At temperature 0 the three texts must be equal (the run stops otherwise).

Tokens/s is completion tokens over the wall time of the whole request (prompt included); the decode-only
rate (tokens after the first over their time) is given for ``wina generate`` and from the server's log line.

    python benchmarks/bench_serve.py                       # writes benchmarks/results/serve_cpu.md
    python benchmarks/bench_serve.py --checkpoint DIR --tokens 64 --repeats 3 --out /tmp/serve.md
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CACHE = Path(os.environ.get("WINA_CACHE", Path.home() / ".cache" / "wina-convert"))


def checkpoint(path: str | None, sparsity: float) -> Path:
    if path:
        return Path(path)
    out = CACHE / "smollm2-wina-serve-bench"
    if not (out / "config.json").is_file():
        source = CACHE / "smollm2-hf"
        if not (source / "config.json").is_file():
            sys.exit(f"{source} is missing: run scripts/fetch_models.py smollm2 --hf {source} first")
        # in a process of its own: what a conversion leaves behind must not slow the timed generations down
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "wina_convert", "convert", str(source), "-o", str(out), "--sparsity",
                        str(sparsity), "-q"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        print(f"converted {source} -> {out} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return out


def start_server(ckpt: Path, device: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "wina_convert", "serve", str(ckpt), "--port", "0",
                                "--device", device], stderr=subprocess.PIPE, text=True, env=env)
    line = process.stderr.readline()
    match = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
    if not match:
        process.kill()
        sys.exit(f"wina serve did not start: {line}{process.stderr.read()}")
    return process, int(match.group(1))


def request_line(process: subprocess.Popen) -> str:
    """The server's next per-request log line (other lines, e.g. warnings, are skipped)."""
    while True:
        line = process.stderr.readline()
        if not line:
            sys.exit("wina serve stopped")
        if " tokens in, " in line:
            return line


def served_request(port: int, model: str, tokens: int, stream: bool) -> tuple[float, str, int]:
    """(seconds, text, completion tokens) of one chat request at temperature 0, timed by the client."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens, "temperature": 0,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if not stream:
        answer = json.loads(response.read())
        seconds = time.perf_counter() - started
        return seconds, answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]
    pieces, used = [], None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            break
        chunk = json.loads(line[6:])
        if chunk["choices"]:
            pieces.append(chunk["choices"][0]["delta"].get("content") or "")
        if chunk.get("usage"):
            used = chunk["usage"]["completion_tokens"]
    seconds = time.perf_counter() - started
    conn.close()
    return seconds, "".join(pieces), used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--sparsity", type=float, default=0.5, help="Target of the conversion (when converting).")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_cpu.md"))
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from wina_convert import load
    from wina_convert.generate import generate, prompt_ids
    from wina_convert.serve import model_id

    ckpt = checkpoint(args.checkpoint, args.sparsity)
    model = load(ckpt, device=args.device)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = prompt_ids(tok, PROMPT, chat=True)
    process, port = start_server(ckpt, args.device)
    rows: dict[str, list[float]] = {"wina generate": [], "wina serve": [], "wina serve, streaming": []}
    decode_rates: dict[str, list[float]] = {"wina generate": [], "wina serve (its log)": []}
    tokens = None
    load_before = os.getloadavg()
    try:
        for round_ in range(args.repeats + 1):  # round 0 warms up
            started = time.perf_counter()
            result = generate(model, tok, ids, args.tokens)
            generate_s = time.perf_counter() - started
            served_s, served_text, served_tokens = served_request(port, model_id(ckpt), args.tokens, stream=False)
            log_line = request_line(process)
            streamed_s, streamed_text, streamed_tokens = served_request(port, model_id(ckpt), args.tokens, stream=True)
            request_line(process)
            if not result.text == served_text == streamed_text:
                sys.exit(f"texts differ at temperature 0:\n{result.text!r}\n{served_text!r}\n{streamed_text!r}")
            if not len(result.tokens) == served_tokens == streamed_tokens:
                sys.exit(f"token counts differ: {len(result.tokens)}, {served_tokens}, {streamed_tokens}")
            tokens = len(result.tokens)
            if round_ == 0:
                continue
            rows["wina generate"].append(tokens / generate_s)
            rows["wina serve"].append(tokens / served_s)
            rows["wina serve, streaming"].append(tokens / streamed_s)
            decode_rates["wina generate"].append(result.decode_tokens_per_second)
            decode_rates["wina serve (its log)"].append(float(re.search(r"([\d.]+) tok/s", log_line).group(1)))
            print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rows.items()), file=sys.stderr)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    load_after = os.getloadavg()

    base = statistics.median(rows["wina generate"])
    lines = [
        "# `wina serve` against `wina generate`: tokens/s on CPU",
        "",
        f"Command: `python benchmarks/bench_serve.py{' --checkpoint ' + args.checkpoint if args.checkpoint else ''}"
        f" --tokens {args.tokens} --repeats {args.repeats}`",
        "",
        f"- checkpoint: `{model_id(ckpt)}` at sparsity {model.wina.sparsity:.2f}, {args.device}, "
        f"dtype {next(model.parameters()).dtype}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
        "(the machine is shared: absolute rates move with it, the three paths are interleaved)",
        f"- request: the chat prompt {PROMPT!r} ({len(ids)} tokens), max_tokens {args.tokens}, temperature 0; "
        f"{tokens} tokens generated, the same text on all three paths",
        f"- {args.repeats} rounds after one warm-up; medians (each round's numbers below)",
        "",
        "| path | tokens/s (whole request) | vs `wina generate` | each round |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, values in rows.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.1f} | {median / base:.3f}x | {', '.join(f'{v:.1f}' for v in values)} |")
    lines += ["", "Decode-only rate (tokens after the first, over their time):", ""]
    lines += [f"- {name}: {statistics.median(values):.1f} tok/s (rounds: {', '.join(f'{v:.1f}' for v in values)})"
              for name, values in decode_rates.items()]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
