"""`transformers serve --trust-remote-code` on a folder the package saved: an OpenAI-compatible server running this
package's model (the folder's remote code, through the ``AutoModelForMultimodalLM`` entry of its ``auto_map``).

One server process per module, on the tiny checkpoint, CPU and fp32; each answer equals the greedy ``generate`` of
the same chat through the processor's chat template, decoded."""

from __future__ import annotations

import base64
import io
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from packaging import version
from PIL import Image

from modeling_llama4 import (
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    build_tokenizer,
    default_tokenizer_model_path,
)
from modeling_llama4.tiny import ensure_tiny_checkpoint, tiny_config

openai = pytest.importorskip("openai", reason="the [serve] extra: transformers serve needs openai")

MAX_TOKENS = 6
STARTUP_TIMEOUT_S = 300
PROMPT = "Describe a sunny day at the beach."


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny checkpoint as the package saves it: weights, processor, remote code and ``auto_map``s."""
    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("cache"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll ``url``/health until the server answers; fail with its log if it exits or does not come up in time."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"transformers serve exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"transformers serve did not answer /health in {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")


TRANSFORMERS_SERVE = ("transformers.cli.transformers", "serve")  # `transformers serve`, as `python -m`
LLAMA4_SERVE = ("modeling_llama4.serve",)  # `llama4-serve`


def start_server(
    program: tuple[str, ...], folder: Path, root: Path, *flags: str
) -> Iterator[tuple[openai.OpenAI, Path]]:
    """Run ``program`` (a module, and its arguments) on ``folder``, remote code cached under ``root``, until the
    caller is done; yield an OpenAI client of it and ``root`` (``modules/``: the remote-code cache; ``serve.log``)."""
    modules_cache = root / "modules"
    log = root / "serve.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Remote code is cached under HF_MODULES_CACHE; offline: the folder is local, nothing is downloaded
    env = {**os.environ, "HF_MODULES_CACHE": str(modules_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", *program, str(folder), "--trust-remote-code"]
    command += ["--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), *flags]
    with log.open("w") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(url, server, log)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120), root
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# With --continuous-batching, serve batches only models it classes as LLMs: a multimodal folder (its processor and
# model type say so) generates one request at a time, images included, as without the flag.
@pytest.fixture(scope="module", params=[(), ("--continuous-batching",)], ids=["generate", "cb-flag"])
def served(request, tiny_folder, tmp_path_factory) -> Iterator[tuple[openai.OpenAI, Path]]:
    yield from start_server(TRANSFORMERS_SERVE, tiny_folder, tmp_path_factory.mktemp("serve"), *request.param)


@pytest.fixture(scope="module")
def reference(tiny_folder):
    """The package's model and processor, loaded from the same folder."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    return model, transformers.AutoProcessor.from_pretrained(tiny_folder)


def picture_url() -> str:
    """A 60 x 150 random PNG as a data: URL (two tiles and the global view at the tiny tile size)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (60, 150, 3), dtype=torch.uint8, generator=generator).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_messages(image_url: str | None = None) -> list[dict]:
    """A one-turn chat in the OpenAI format: the prompt, after a picture if given."""
    parts = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": PROMPT}]}]


def processor_messages(image_url: str | None = None) -> list[dict]:
    """The same chat as serve hands a multimodal model's processor."""
    parts = [{"type": "image", "url": image_url}] if image_url else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": PROMPT}]}]


def greedy_answer(reference, messages: list[dict]) -> tuple[str, int]:
    """What ``generate`` answers to ``messages`` (greedy, ``MAX_TOKENS``), decoded as serve decodes, and the
    prompt's length in tokens."""
    model, processor = reference
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    return processor.decode(output[0, prompt_length:], skip_special_tokens=True), prompt_length


def ask(client: openai.OpenAI, folder: Path, messages: list[dict], stream: bool) -> tuple[str, int | None]:
    """The server's answer to ``messages`` (greedy, ``MAX_TOKENS``) and, unstreamed, the prompt's length it reports."""
    request = dict(model=str(folder), messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    if not stream:
        completion = client.chat.completions.create(**request)
        return completion.choices[0].message.content, completion.usage.prompt_tokens
    chunks = client.chat.completions.create(**request, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices), None


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])


@STREAM
def test_text_chat_equals_generate(served, tiny_folder, reference, stream):
    client, _ = served
    expected, prompt_length = greedy_answer(reference, processor_messages())
    answer, served_prompt_length = ask(client, tiny_folder, openai_messages(), stream)
    assert expected  # a non-empty answer to compare
    assert answer == expected
    assert served_prompt_length in (None, prompt_length)


@STREAM
def test_image_chat_equals_generate(served, tiny_folder, reference, stream):
    client, _ = served
    image = picture_url()
    expected, prompt_length = greedy_answer(reference, processor_messages(image))
    assert expected != greedy_answer(reference, processor_messages())[0]  # a dropped picture would show
    answer, served_prompt_length = ask(client, tiny_folder, openai_messages(image), stream)
    assert answer == expected
    assert served_prompt_length in (None, prompt_length)  # the picture's tokens are in the served prompt


def test_serve_runs_the_folders_remote_code(served, tiny_folder):
    """The served model is the folder's copy of this package's model, not transformers' built-in Llama 4: serve
    imported the folder's modeling_llama4.py (configuration and processing modules do not import it)."""
    client, root = served
    ask(client, tiny_folder, openai_messages(), stream=False)
    assert list((root / "modules").rglob("modeling_llama4.py"))


# ----------------------------------------------------------------------------------------------------------------
# llama4-serve: text-only folders, which `transformers serve` loads as transformers' built-in Llama4ForCausalLM

requires_loader = pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse("5.25"),
    reason="llama4-serve needs transformers >= 5.25: 5.24's Serve builds its model manager and runs the server "
    "inside __init__, so no model loader can be put in without patching it",
)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """The tiny text-only model (``llama4_text``) saved by the package with its tokenizer."""
    folder = tmp_path_factory.mktemp("text")
    torch.manual_seed(0)
    Llama4ForCausalLM(tiny_config().text_config).save_pretrained(folder)
    build_tokenizer(default_tokenizer_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_reference(text_folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(text_folder, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(text_folder)


@requires_loader
@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_llama4_serve_loads_this_packages_text_model(text_folder, tiny_folder, trust_remote_code):
    """Text-only folders load as this package's Llama4ForCausalLM (the installed one: a registered class wins over
    remote code); multimodal ones as transformers serve loads them."""
    from modeling_llama4.serve import Llama4ModelLoader

    loader = Llama4ModelLoader(device="cpu", dtype="float32", trust_remote_code=trust_remote_code)
    for folder, model_class in ((text_folder, Llama4ForCausalLM), (tiny_folder, Llama4ForConditionalGeneration)):
        assert type(loader._load_model(str(folder))) is model_class


@requires_loader
def test_llama4_serve_keeps_serves_settings_in_its_loader():
    """``Serve.__init__`` sets transformers' loader; Llama4Serve holds ours with its settings, and the model's process
    (spawned) gets it by pickle."""
    from transformers.cli.serving.model_manager import ModelLoader

    from modeling_llama4.serve import Llama4ModelLoader, Llama4Serve

    command = Llama4Serve.__new__(Llama4Serve)
    command.loader = ModelLoader(device="cpu", dtype="float32", trust_remote_code=True)
    loader = pickle.loads(pickle.dumps(command.loader))
    assert type(loader) is Llama4ModelLoader
    assert (loader.device, loader.dtype, loader.trust_remote_code) == ("cpu", torch.float32, True)


# A text model: with --continuous-batching, serve batches its requests (the model's init_continuous_batching).
@pytest.fixture(scope="module", params=[(), ("--continuous-batching",)], ids=["generate", "continuous-batching"])
def llama4_served(request, text_folder, tmp_path_factory) -> Iterator[tuple[openai.OpenAI, Path]]:
    yield from start_server(LLAMA4_SERVE, text_folder, tmp_path_factory.mktemp("llama4_serve"), *request.param)


@requires_loader
@STREAM
def test_llama4_serve_text_folder_chat_equals_generate(llama4_served, text_folder, text_reference, stream):
    client, root = llama4_served
    expected, prompt_length = greedy_answer(text_reference, [{"role": "user", "content": PROMPT}])
    answer, served_prompt_length = ask(client, text_folder, openai_messages(), stream)
    assert expected
    assert answer == expected
    assert served_prompt_length in (None, prompt_length)
    assert "Falling back to sequential generation" not in (root / "serve.log").read_text()  # batched, if asked
