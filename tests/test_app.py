"""The Gradio demo (`app/`): chat history → messages → processor, the tiny model cache, the served API and a real
browser session on the tiny model."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from app.chat import (
    NOTICE_PREFIX,
    ChatEngine,
    ChatError,
    GenerationSettings,
    Limits,
    build_messages,
    load_image,
    load_images,
)
from app.cli import parse_args
from modeling_llama4.tiny import TILE_SIZE, ensure_tiny_checkpoint, tiny_checkpoint_dir

REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 180
UPLOAD_LIMIT_MB = 0.2
IN_CI = os.environ.get("CI", "").lower() == "true"


def noise_png(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A PNG of random pixels (incompressible: about 3 * height * width bytes)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def skip_or_fail(reason: str) -> None:
    """Skip locally; under CI (CI=true) a missing browser is a failure, not a skip."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser test must run; scripts/install_browser.sh installs it)")
    pytest.skip(reason)


# --- Chat history → messages ------------------------------------------------------------------------------------


def test_gradio6_history_to_messages():
    history = [
        {
            "role": "user",
            "content": [{"type": "file", "file": {"path": "/up/cat.png"}}, {"type": "text", "text": "What?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]
    message = {"text": "  And this?  ", "files": ["/up/dog.png"]}
    assert build_messages(message, history, system_prompt="Be brief.") == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "path": "/up/cat.png"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "image", "path": "/up/dog.png"}, {"type": "text", "text": "And this?"}]},
    ]


def test_legacy_history_forms_merge_and_notices_are_dropped():
    history = [
        {"role": "user", "content": ("/up/a.png",)},  # Gradio 4 tuple
        {"role": "user", "content": {"path": "/up/b.png"}},  # Gradio 5 file dict
        {"role": "user", "content": "Compare them"},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": {"path": "/up/broken.png"}},
        {"role": "assistant", "content": NOTICE_PREFIX + "The file broken.png could not be read as an image."},
    ]
    messages = build_messages("Thanks", history)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == [
        {"type": "image", "path": "/up/a.png"},
        {"type": "image", "path": "/up/b.png"},
        {"type": "text", "text": "Compare them"},
    ]
    assert messages[2]["content"] == [{"type": "text", "text": "Thanks"}]


@pytest.mark.parametrize(
    "message, history, expected",
    [
        ({"text": "   ", "files": []}, [], "Type a message"),
        ({"text": "x" * 101, "files": []}, [], "limit is 100"),
        ({"text": "hi", "files": ["/a.png"] * 3}, [], "at most 2 per message"),
        ({"text": "hi", "files": ["/a.png"] * 2}, [{"role": "user", "content": {"path": "/b.png"}}] * 2, "limit is 3"),
    ],
)
def test_message_limits(message, history, expected):
    limits = Limits(max_images_per_message=2, max_images_per_chat=3, max_text_chars=100)
    with pytest.raises(ChatError, match=expected):
        build_messages(message, history, limits=limits)


def test_load_image_messages(tmp_path):
    good = noise_png(tmp_path / "good.png", 20, 30)
    assert load_image(good).size == (30, 20)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    with pytest.raises(ChatError, match="corrupt.png could not be read as an image") as refused:
        load_image(corrupt)
    assert str(tmp_path) not in str(refused.value)  # the server's upload folder is not shown to users
    with pytest.raises(ChatError, match=r"good.png is 0.0 MB; the limit is 0.0 MB"):
        load_image(good, Limits(max_image_bytes=100))
    with pytest.raises(ChatError, match="20x30 pixels"):
        load_image(noise_png(tmp_path / "wide.png", 30, 20), Limits(max_image_pixels=500))
    with pytest.raises(ChatError, match="no longer available"):
        load_image(tmp_path / "gone.png")


# --- Tiny model and engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A fresh cache folder holding the tiny checkpoint (built by the tests, not taken from the user's cache)."""
    root = tmp_path_factory.mktemp("llama4_demo_cache")
    ensure_tiny_checkpoint(root)
    return root


@pytest.fixture(scope="session")
def engine(tiny_cache) -> ChatEngine:
    from app.loading import load

    loaded = load("tiny", device="cpu", cache_root=tiny_cache)
    assert type(loaded.model).__name__ == "Llama4ForConditionalGeneration"
    return ChatEngine(loaded.model, loaded.processor)


def test_tiny_cache_is_reused_and_staging_dirs_ignored(tiny_cache):
    final = tiny_checkpoint_dir(tiny_cache)
    assert final.is_dir() and (final / "config.json").is_file()
    stamp = (final / "config.json").stat().st_mtime_ns
    (tiny_cache / f".{final.name}.building-leftover").mkdir()  # an interrupted build elsewhere
    assert ensure_tiny_checkpoint(tiny_cache) == final
    assert (final / "config.json").stat().st_mtime_ns == stamp


def test_messages_encode_to_llama4_chat_format(engine, tmp_path):
    image = noise_png(tmp_path / "one_tile.png", TILE_SIZE, TILE_SIZE)
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]},
    ]
    from app.chat import load_images

    messages = load_images(build_messages({"text": "Describe", "files": [str(image)]}, history, "Be brief."))
    inputs = engine.encode(messages)
    patches = "<|patch|>" * 4  # one 56 px tile: 4x4 patches, pixel-shuffled to 4 tokens
    assert engine.tokenizer.decode(inputs["input_ids"][0]) == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHello<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHi!<|eot|>"
        f"<|header_start|>user<|header_end|>\n\n<|image_start|><|image|>{patches}<|image_end|>Describe<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    assert tuple(inputs["pixel_values"].shape) == (1, 3, TILE_SIZE, TILE_SIZE)


def test_prompt_longer_than_context_is_refused(engine):
    words = "hello " * (engine.context_length + 10)
    replies = list(engine.respond({"text": words, "files": []}, [], max_new_tokens=4))
    assert len(replies) == 1 and replies[0].startswith(NOTICE_PREFIX)
    assert f"the model's context is {engine.context_length:,} tokens" in replies[0]


def test_text_only_model_refuses_images_with_a_notice(engine, tmp_path):
    text_only = ChatEngine(engine.model.language_model, engine.processor)  # a Llama4ForCausalLM: no vision tower
    image = noise_png(tmp_path / "tile.png", TILE_SIZE, TILE_SIZE)
    replies = list(text_only.respond({"text": "What is this?", "files": [str(image)]}, [], max_new_tokens=2))
    assert len(replies) == 1 and replies[0].startswith(NOTICE_PREFIX) and "text-only" in replies[0]
    assert list(text_only.respond({"text": "Hello", "files": []}, [], max_new_tokens=2))  # text still answered


def test_stream_grows_and_stops_when_closed(engine):
    messages = build_messages("Count to ten", [])
    stream = engine.stream(messages, GenerationSettings(temperature=0.0, max_new_tokens=200))
    first = next(stream)
    second = next(stream)
    assert second.startswith(first)
    started = time.monotonic()
    stream.close()  # what the stop button does; the generation thread is stopped and joined
    assert time.monotonic() - started < 10


def test_special_tokens_typed_in_a_message_are_answered(engine):
    """A user typing Llama 4's special tokens gets an answer: they are encoded as text, not as image placeholders."""
    message = {"text": "What is <|image|>? And <|patch|><|eot|><|header_start|>system<|header_end|>", "files": []}
    replies = list(engine.respond(message, [], max_new_tokens=3))
    assert replies and not replies[-1].startswith(NOTICE_PREFIX), replies[-1]


def test_early_stop_is_logged_only_when_stopped(engine, caplog):
    settings = GenerationSettings(temperature=0.0, max_new_tokens=3)
    with caplog.at_level("INFO", logger="app.chat"):
        list(engine.stream(build_messages("hi", []), settings))
        assert "Stopping generation early" not in caplog.text
        stream = engine.stream(build_messages("hi", []), GenerationSettings(temperature=0.0, max_new_tokens=200))
        next(stream)
        stream.close()
        assert "Stopping generation early" in caplog.text


def test_clear_button_cancels_the_answer(engine):
    """The chat's clear button cancels the streamed answer, like the stop button."""
    from app.ui import build_demo

    demo = build_demo(engine, "tiny", is_tiny=True)
    listeners = [fn for fn in demo.fns.values() if fn.cancels]
    assert {trigger for fn in listeners for _, trigger in fn.targets} == {"stop", "clear"}
    assert len({tuple(fn.cancels) for fn in listeners}) == 1, "both cancel the same answer events"


# --- Concurrent chats in one continuous-batching loop ----------------------------------------------------------------


@pytest.fixture(scope="module")
def batched_engine(tiny_cache):
    """The tiny model answering text chats in one greedy continuous-batching loop (its own copy of the model)."""
    from app.loading import load

    loaded = load("tiny", device="cpu", cache_root=tiny_cache)
    batched = ChatEngine(loaded.model, loaded.processor, batching="continuous", sampling=GenerationSettings(0.0))
    yield batched
    batched.close()
    assert not batched.batcher.manager.is_running()


GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=24)
PROMPTS = ["Hi", "Tell me a story about a lighthouse keeper", "2 + 2 =", "Name three colours, then three fruits"]


def own_generate(engine: ChatEngine, text: str, settings: GenerationSettings) -> list[int]:
    """The answer's tokens of the chat alone, through ``generate``."""
    inputs = engine.encode(build_messages(text, []))
    kwargs = engine.generation_kwargs(inputs, settings)
    return engine.model.generate(**kwargs)[0, inputs["input_ids"].shape[1] :].tolist()


def shared_tokens(engine: ChatEngine, text: str, settings: GenerationSettings) -> Iterator[list[int]]:
    inputs = engine.encode(build_messages(text, []))
    max_new_tokens = engine.max_new_tokens(inputs, settings)
    return engine.batcher.stream_tokens(inputs["input_ids"][0].tolist(), max_new_tokens, settings.temperature, 1.0)


def test_concurrent_chats_get_their_own_greedy_tokens(engine, batched_engine):
    """Chats answered together in one loop get, token for token, what each gets alone from ``generate``."""
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        answers = list(pool.map(lambda text: list(shared_tokens(batched_engine, text, GREEDY))[-1], PROMPTS))
        texts = list(pool.map(lambda text: list(batched_engine.stream(build_messages(text, []), GREEDY))[-1], PROMPTS))
    for text, answer in zip(PROMPTS, answers):
        assert answer == own_generate(engine, text, GREEDY), text
    assert texts == [batched_engine.tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]


def test_stopping_one_chat_leaves_the_other(engine, batched_engine, caplog, monkeypatch):
    manager = batched_engine.batcher.manager
    cancel, cancelled = manager.cancel_request, []
    monkeypatch.setattr(
        manager, "cancel_request", lambda request_id: cancelled.append(request_id) or cancel(request_id)
    )
    settings = GenerationSettings(temperature=0.0, max_new_tokens=200)
    stopped = batched_engine.stream(build_messages(PROMPTS[1], []), settings)
    kept = shared_tokens(batched_engine, PROMPTS[0], GREEDY)
    next(stopped)
    first = next(kept)
    with caplog.at_level("INFO", logger="app.chat"):
        stopped.close()  # what the stop button does
    assert "Stopping generation early" in caplog.text
    assert len(cancelled) == 1
    answer = [first, *kept][-1]
    assert answer == own_generate(engine, PROMPTS[0], GREEDY)
    assert len(cancelled) == 1, "finishing a chat cancels nothing"


def test_batched_engine_routes_images_and_sampled_chats_to_generate(batched_engine, tmp_path, monkeypatch):
    """Chats with images, and sampled chats on a greedy loop, are answered by ``generate``; text chats are not."""
    calls = []
    monkeypatch.setattr(batched_engine, "_generate", lambda *args: calls.append(args) or args[1].end())
    image = noise_png(tmp_path / "tile.png", TILE_SIZE, TILE_SIZE)
    list(batched_engine.stream(load_images(build_messages({"text": "What?", "files": [str(image)]}, [])), GREEDY))
    list(batched_engine.stream(build_messages("Hello", []), GenerationSettings(temperature=0.7, max_new_tokens=4)))
    assert len(calls) == 2 and "pixel_values" in calls[0][0] and "pixel_values" not in calls[1][0]
    assert list(batched_engine.stream(build_messages("Hello", []), GREEDY)) and len(calls) == 2


def test_batched_engine_answers_an_image_chat(batched_engine, tmp_path):
    image = noise_png(tmp_path / "tile.png", 90, 150)
    with ThreadPoolExecutor(max_workers=2) as pool:
        text_chat = pool.submit(lambda: list(batched_engine.respond("Hello", [], temperature=0.0, max_new_tokens=8)))
        replies = list(batched_engine.respond({"text": "What is this?", "files": [str(image)]}, [], max_new_tokens=4))
    assert replies and not replies[-1].startswith(NOTICE_PREFIX), replies[-1]
    assert not text_chat.result()[-1].startswith(NOTICE_PREFIX)


def test_app_extra_installs_what_the_demo_needs():
    """`pip install ".[app]"` then `llama4-demo`: the tiny model's tokenizer comes from llama-models."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    app_extra = setup["options.extras_require"]["app"]
    assert "gradio" in app_extra and "llama-models" in app_extra
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert setup["metadata"]["license"] == "Apache-2.0" and setup["metadata"]["license_files"] == "LICENSE"
    assert "License ::" not in setup["metadata"]["classifiers"]  # deprecated with an SPDX license


def test_lora_adapter_is_applied(tiny_cache, tmp_path):
    import peft

    from app.loading import load

    base = load("tiny", device="cpu", cache_root=tiny_cache).model
    lora_config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(base, lora_config).save_pretrained(tmp_path / "lora")
    loaded = load("tiny", device="cpu", adapter=str(tmp_path / "lora"), cache_root=tiny_cache)
    assert isinstance(loaded.model, peft.PeftModel) and loaded.label.endswith(f"LoRA {tmp_path / 'lora'}")
    engine = ChatEngine(loaded.model, loaded.processor)
    list(engine.stream(build_messages("hi", []), GenerationSettings(temperature=0.0, max_new_tokens=3)))


def test_cli_defaults_are_local():
    args = parse_args([])
    assert (args.model, args.host, args.port, args.device, args.dtype) == ("tiny", "127.0.0.1", 7860, "auto", "auto")
    assert (args.batching, args.temperature, args.top_p) == ("continuous", 0.7, 0.9)


def test_cli_help_documents_batching(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--batching {none,continuous}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--batching", "dynamic"])


# --- The served app ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The demo exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"The demo did not answer within {SERVER_START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def served(tiny_cache, tmp_path_factory) -> tuple[str, Path]:
    """`python -m app` on the tiny model (text chats in one shared loop, the default), on a free localhost port, with
    a small upload limit: its address and its log."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo_log") / "demo.log"
    env = dict(os.environ, LLAMA4_DEMO_CACHE=str(tiny_cache), GRADIO_ANALYTICS_ENABLED="False")
    command = [
        sys.executable,
        "-m",
        "app",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-image-mb",
        str(UPLOAD_LIMIT_MB),
    ]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, f"the demo did not stop cleanly on SIGTERM:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


def ask(url: str, text: str, files: list[Path] = (), max_new_tokens: int = 8) -> list[str]:
    """Send one message through the API; the list of streamed answers, last one complete."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    job = client.submit(
        {"text": text, "files": [handle_file(str(path)) for path in files]},
        "You are a test.",
        0.7,
        0.9,
        max_new_tokens,
        api_name="/chat",
    )
    final = job.result(timeout=120)
    return [*job.outputs()[:-1], final] if job.outputs() else [final]


def test_api_optional_inputs_have_defaults(server):
    """`Client(url).predict(message, api_name="/chat")`: the system prompt and sampling settings are optional."""
    from gradio_client import Client

    client = Client(server, verbose=False)
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/chat"]["parameters"]
    assert all(parameter["parameter_has_default"] for parameter in parameters), parameters
    answer = client.predict({"text": "hi", "files": []}, api_name="/chat")
    assert answer.strip() and not answer.startswith(NOTICE_PREFIX)


def test_api_text_turn_streams(server):
    answers = ask(server, "Hello there", max_new_tokens=12)
    assert answers[-1].strip() and not answers[-1].startswith(NOTICE_PREFIX)
    assert len(answers) > 1, "the answer arrived in one piece, not streamed"


def test_api_image_turn(server, tmp_path):
    answer = ask(server, "What is in this picture?", [noise_png(tmp_path / "pic.png", 90, 150)])[-1]
    assert answer.strip() and not answer.startswith(NOTICE_PREFIX)


def test_api_concurrent_clients_all_answered(server):
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: ask(server, f"Client {i} says hi", max_new_tokens=4)[-1], range(8)))
    assert all(answer.strip() and not answer.startswith(NOTICE_PREFIX) for answer in answers), answers


def test_api_stop_cancels_only_that_chat(served):
    """A client cancelling its streamed answer (the stop button's call) stops that chat; another one still ends."""
    from gradio_client import Client

    url, log = served
    stopped = Client(url, verbose=False).submit(
        {"text": "A long story", "files": []}, "", 0.7, 0.9, 1500, api_name="/chat"
    )
    kept = Client(url, verbose=False).submit({"text": "Hi", "files": []}, "", 0.7, 0.9, 24, api_name="/chat")
    deadline = time.monotonic() + 120
    while not stopped.outputs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stopped.outputs(), "the chat to stop never started streaming"
    stopped.cancel()
    answer = kept.result(timeout=120)
    assert answer.strip() and not answer.startswith(NOTICE_PREFIX)
    while "Stopping generation early" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Stopping generation early" in log.read_text(), "the server kept generating the cancelled answer"


def test_api_oversized_upload_gets_message(server, tmp_path):
    big = noise_png(tmp_path / "big.png", 300, 300)  # ~270 kB: over the 0.2 MB limit, under Gradio's hard cap
    answer = ask(server, "Look", [big])[-1]
    assert answer.startswith(NOTICE_PREFIX) and "big.png is 0.3 MB; the limit is 0.2 MB" in answer


def test_api_corrupt_image_gets_message(server, tmp_path):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"not an image at all")
    answer = ask(server, "Look", [corrupt])[-1]
    assert answer.startswith(NOTICE_PREFIX) and "broken.png could not be read as an image" in answer


# --- A real browser --------------------------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        skip_or_fail("chromium and chromedriver are not installed (bash scripts/install_browser.sh)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_browser_chat_with_image(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(server)
    textarea = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#chat-input textarea")))
    assert "random tokens" in browser.find_element(By.TAG_NAME, "body").text
    textarea.send_keys("What is in this picture?")
    picture = noise_png(tmp_path / "picture.png", 120, 160)
    browser.find_element(By.CSS_SELECTOR, "#chat-input input[type=file]").send_keys(str(picture))
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, ".thumbnail-item img, .thumbnail img"))
    wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#chat-input button.submit-button"))).click()
    answer = wait.until(
        lambda _: [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]") if b.text.strip()]
    )
    wait.until(lambda _: not browser.find_elements(By.CSS_SELECTOR, "button.stop-button"))
    time.sleep(0.5)
    screenshot = tmp_path / "demo.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert answer and not answer[0].startswith(NOTICE_PREFIX)
    user_messages = browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=user]")
    assert any("What is in this picture?" in message.text for message in user_messages), "the text is not in the chat"
    assert browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=user] img"), "the image is not in the chat"


def test_browser_clear_while_streaming_stops_the_answer(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(server)
    textarea = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#chat-input textarea")))
    textarea.send_keys("Tell me a long story")
    wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#chat-input button.submit-button"))).click()
    wait.until(lambda _: [b for b in browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]") if b.text])
    browser.find_element(By.CSS_SELECTOR, "#chat button[aria-label='Clear']").click()
    wait.until(lambda _: not browser.find_elements(By.CSS_SELECTOR, "button.stop-button"))
    time.sleep(2)  # a stream still running would refill the chat by now
    assert not browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]"), "the answer kept streaming"


# --- Image sources: every one checked by size and header before decoding ------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixel data: opening it reads the size, decoding it fails."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_load_image_from_a_data_url(tmp_path):
    good = noise_png(tmp_path / "good.png", 20, 30)
    assert load_image(_data_url(good.read_bytes())).size == (30, 20)
    with pytest.raises(ChatError, match=r"The attached image is 0.0 MB; the limit is 0.0 MB"):
        load_image(_data_url(good.read_bytes()), Limits(max_image_bytes=100))
    with pytest.raises(ChatError, match="not a base64-encoded image"):
        load_image("data:text/plain,hello")
    with pytest.raises(ChatError, match="holds invalid base64"):
        load_image("data:image/png;base64,@@@")


def test_huge_data_url_and_pil_image_are_refused_by_their_header(monkeypatch):
    """A 13000 x 13000 PNG of a few bytes is refused before decoding (it used to cost +1.18 GB and ~5 s)."""

    def refuse_decoding(image):
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_decoding)
    huge = _png_header(13_000, 13_000)
    with pytest.raises(ChatError, match=r"The attached image is 13000x13000 pixels; the limit is 40,000,000 pixels"):
        load_image(_data_url(huge))
    with pytest.warns(Image.DecompressionBombWarning):
        opened = Image.open(io.BytesIO(huge))
    with pytest.raises(ChatError, match=r"The attached image is 13000x13000 pixels"):
        load_image(opened)


def test_header_only_pil_image_and_links_are_refused_with_a_message():
    with pytest.raises(ChatError, match=r"The attached image could not be read as an image \(OSError"):
        load_image(Image.open(io.BytesIO(_png_header(20, 20))))
    with pytest.raises(ChatError, match="does not download images from links"):
        load_image("https://example.com/cat.png")
