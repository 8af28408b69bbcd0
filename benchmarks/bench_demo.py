"""Demo latency under concurrent users: one chat at a time (`--batching none`) vs one shared continuous-batching loop
(`--batching continuous`), the same demo and model in the same run.

For each mode the demo (`python -m app`) is launched on the tiny model (or `--model`) on a free localhost port, greedy
(`--temperature 0`), and `--chats` users each send one text message at once through gradio_client, the way an API
client does. A chat's latency runs from its submission to its complete answer. Both modes answer greedily, so
every chat must get the same answer from both: the script checks it.

The tiny model's decode steps are dominated by its 202,048-word output projection, whose cost grows with the rows
a step carries; ``--model scaled`` (hidden 512, 4 layers of 16 experts, same vocabulary) is dominated by its layers'
weights, as a real checkpoint is.

    python benchmarks/bench_demo.py [--chats 16] [--max-new-tokens 32] [--threads 1] [--model tiny|scaled|PATH]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(batching: str, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    """The demo in `batching` mode, serving on a free port once its page answers."""
    port = free_port()
    command = [sys.executable, "-m", "app", "--model", args.model, "--port", str(port), "--device", "cpu"]
    command += ["--batching", batching, "--temperature", "0", "--max-new-tokens", str(args.max_new_tokens)]
    command += ["--log-level", "WARNING"]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The demo exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"The demo did not answer within {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def chat_latencies(url: str, chats: int, max_new_tokens: int) -> tuple[list[float], list[str]]:
    """Seconds from submission to the complete answer for `chats` users sending at once, and their answers."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in range(chats)]  # connected before the clock starts

    def chat(user: int) -> tuple[float, str]:
        message = {"text": f"User {user}: tell me a story about the number {user}.", "files": []}
        start = time.perf_counter()
        answer = clients[user].predict(message, "", 0.0, 0.9, max_new_tokens, api_name="/chat")
        return time.perf_counter() - start, answer

    chat(0)  # warm-up: the first answer of a fresh server builds caches
    with ThreadPoolExecutor(max_workers=chats) as pool:
        results = list(pool.map(chat, range(chats)))
    return [seconds for seconds, _ in results], [answer for _, answer in results]


def measure(batching: str, args: argparse.Namespace, log: Path) -> tuple[list[float], list[str]]:
    process, url = launch(batching, args, log)
    try:
        return chat_latencies(url, args.chats, args.max_new_tokens)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise RuntimeError(f"The demo ({batching}) did not stop within 30 s of SIGTERM") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="tiny",
        help="the demo's --model: 'tiny', a converted folder or a Hub id; or 'scaled': the tiny model with the scaled "
        "Scout's text layers (tiny.scaled_demo_config), written to a temporary folder",
    )
    parser.add_argument("--chats", type=int, default=16, help="users sending a message at once")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length of every chat")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of the demo (OMP_NUM_THREADS; default: torch's own)"
    )
    args = parser.parse_args()
    print(
        f"model {args.model}, CPU, {args.threads or torch.get_num_threads()} threads, {args.chats} concurrent chats, {args.max_new_tokens} new tokens"
    )
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        if args.model == "scaled":
            from modeling_llama4.tiny import build_checkpoint, scaled_demo_config

            args.model = str(Path(logs) / "scaled")
            build_checkpoint(Path(args.model), scaled_demo_config())
        for batching in ("none", "continuous"):
            latencies, answers = measure(batching, args, Path(logs) / f"{batching}.log")
            results[batching] = (statistics.median(latencies), max(latencies), answers)
            median, worst, _ = results[batching]
            print(f"--batching {batching:<10}  median {median:6.2f} s   max {worst:6.2f} s")
    (before, before_max, before_answers), (after, after_max, after_answers) = results["none"], results["continuous"]
    print(f"after/before: median {after / before:.2f}x, max {after_max / before_max:.2f}x (goal: median <= 0.30x)")
    same = sum(a == b for a, b in zip(before_answers, after_answers))
    print(f"same answers in both modes: {same}/{args.chats}")
    if same != args.chats:
        raise SystemExit("The modes answered differently")


if __name__ == "__main__":
    main()
