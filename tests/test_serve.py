"""`transformers serve` (OpenAI-compatible) on the demo model, through `rwkv-hf serve`, as a client would call it.

The server loads a folder with getattr(transformers, config.architectures[0]); before this model had a name of its
own that was transformers' built-in RWKV-4 with random weights (HTTP 200, " Switzerland Switzerland"). Streaming
needs the fast tokenizer (its ``_tokenizer`` drives the server's incremental decoder).
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi", reason="transformers serve needs the 'integrations' extra (transformers[serving])")
pytest.importorskip("uvicorn", reason="transformers serve needs the 'integrations' extra (transformers[serving])")

from rwkv_hf import demo  # noqa: E402

QUESTIONS = ["What is the capital of France?", "How much is 7 plus 4?", "Spell the word house."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return demo.demo_model_dir(tmp_path_factory.mktemp("demo_cache"))


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "rwkv_hf.cli", "serve", str(folder), "--port", str(port), "--device", "cpu",
         "--host", "127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if process.poll() is not None:
                break
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not come up in 120 s")
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"rwkv-hf serve exited: {log.read()[-3000:]}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def post(url, body, stream=False):
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        if not stream:
            return json.loads(response.read())
        text = ""
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
        return text


def local_greedy_reply(folder, question):
    model, tokenizer = demo.load_demo(model_dir=folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.turn_end_ids,
                             pad_token_id=0)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streaming"])
def test_chat_completions_answer_as_generate_does(server, folder, stream):
    for question in QUESTIONS:
        body = {"model": str(folder), "messages": [{"role": "user", "content": question}], "temperature": 0,
                "max_tokens": 24, "stream": stream}
        answer = post(server, body, stream) if stream else post(server, body)["choices"][0]["message"]["content"]
        expected = local_greedy_reply(folder, question)
        assert answer.strip() == expected.strip(), (question, answer, expected)
    assert "Paris" in post(server, {"model": str(folder), "temperature": 0, "max_tokens": 24,
                                    "messages": [{"role": "user", "content": QUESTIONS[0]}]})["choices"][0]["message"]["content"]


def test_transformers_chat_talks_to_it(server, folder):
    """`transformers chat` (the terminal client) against the server, one question on its stdin."""
    import shutil

    chat = shutil.which("transformers", path=str(__import__("pathlib").Path(sys.executable).parent))
    if chat is None:
        pytest.skip("the transformers command is not installed next to this interpreter")
    result = subprocess.run(
        [chat, "chat", str(folder), server, "do_sample=False", "max_new_tokens=20"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=120,
    )
    assert "Paris" in result.stdout, (result.stdout[-2000:], result.stderr[-2000:])
