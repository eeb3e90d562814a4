"""Images for vision models (a tiny random Gemma 3 with a SigLIP tower): the Python API, /v1 parts, cache
reuse that stays exact with images in the history, and bad input."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import openai
import pytest
import torch
from PIL import Image

import app
from llm_backends import images
from llm_backends.remote import openai_message
from llm_backends.serving import ModelRegistry
from test_app import free_port

GREEDY = {"temperature": 0, "max_new_tokens": 8}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # a format that would run Ghostscript


def picture(seed: int, size=(40, 50)) -> Image.Image:
    pixels = np.random.RandomState(seed).rand(size[0], size[1], 3) * 255
    return Image.fromarray(pixels.astype("uint8"))


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def ask(image, text="What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image", "image": image}]}]


def reply(model, messages, session=None):
    chunks = list(model.stream_chat(messages, session_id=session, **GREEDY))
    return "".join(c.text for c in chunks), chunks[-1].stats


def test_a_vision_checkpoint_loads_as_image_text_to_text(gemma3_vision, gemma3):
    assert gemma3_vision.capabilities.images
    assert type(gemma3_vision.model).__name__ == "Gemma3ForConditionalGeneration"
    assert gemma3_vision.info.family == "gemma3"
    assert not gemma3.capabilities.images


def test_the_image_changes_the_answer(gemma3_vision):
    first, _ = reply(gemma3_vision, ask(picture(0)))
    second, _ = reply(gemma3_vision, ask(picture(1)))
    assert first and second and first != second


def test_the_same_pixels_are_the_same_image_in_the_ledger(gemma3_vision):
    model = gemma3_vision
    same = model.render(model.request(ask(picture(0))).messages)
    again = model.render(model.request(ask(Image.open(io.BytesIO(png(picture(0)))))).messages)
    other = model.render(model.request(ask(picture(1))).messages)
    assert same == again
    marked = [i for i, t in enumerate(same) if t < 0]
    assert len(marked) == 4 and marked == list(range(marked[0], marked[0] + 4))
    assert [t for t in same if t >= 0] == [t for t in other if t >= 0]
    assert all(same[i] != other[i] for i in marked)


def test_a_follow_up_after_an_image_reuses_its_tokens_and_answers_as_a_fresh_read(gemma3_vision):
    model = gemma3_vision
    model.clear_sessions()
    first = ask(picture(2))
    answer, stats = reply(model, first, "look")
    assert stats.cached_tokens == 0
    follow = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And its colours?"}]
    reused, stats = reply(model, follow, "look")
    image_end = max(i for i, t in enumerate(model.render(model.request(first).messages)) if t < 0)
    assert stats.cached_tokens > image_end  # the image was not read again
    fresh, _ = reply(model, follow)
    assert reused == fresh


def test_another_image_in_the_same_place_is_read_not_reused(gemma3_vision):
    model = gemma3_vision
    model.clear_sessions()
    reply(model, ask(picture(3)), "swap")
    swapped, stats = reply(model, ask(picture(4)), "swap")
    prompt = model.render(model.request(ask(picture(4))).messages)
    assert stats.cached_tokens <= min(i for i, t in enumerate(prompt) if t < 0)
    assert swapped == reply(model, ask(picture(4)))[0]


def test_prefill_pieces_never_split_an_image(gemma3_vision, monkeypatch):
    model = gemma3_vision
    prompt = model.render(model.request(ask(picture(5))).messages)
    start = min(i for i, t in enumerate(prompt) if t < 0)
    pieces = []
    forward = model.engine.runner.forward

    def recording(entry, tokens, **options):
        pieces.append(list(tokens))
        return forward(entry, tokens, **options)

    expected, _ = reply(model, ask(picture(5)))
    monkeypatch.setattr(model.engine.runner, "forward", recording)
    monkeypatch.setattr(model.engine, "prefill_chunk", start + 2)  # a piece would end inside the image
    answer, _ = reply(model, ask(picture(5)))
    assert answer == expected
    assert len(pieces) >= 2
    assert sum(1 for piece in pieces for t in piece if t < 0 and images.place(t) == 0) == 1
    assert all(images.place(piece[0]) == 0 for piece in pieces if piece[0] < 0)


def test_create_takes_openai_parts_and_pil_images(gemma3_vision):
    image = picture(6)
    by_pil = gemma3_vision.create(
        [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}], temperature=0, max_tokens=8
    )
    by_url = gemma3_vision.create(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": data_url(image), "detail": "auto"}},
                ],
            }
        ],
        temperature=0,
        max_tokens=8,
    )
    expected, _ = reply(gemma3_vision, ask(image))
    assert by_pil["choices"][0]["message"]["content"] == by_url["choices"][0]["message"]["content"] == expected


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (
            [
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()},
                }
            ],
            r"is not an image that can be read \(PNG, JPEG, WebP or GIF\)$",  # nothing of the server's internals
        ),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "not valid base64"),
        ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], "data: URL"),
        ([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}], "--image-urls"),
        ([{"type": "image", "image": "/etc/passwd"}], "must be a data: URL"),
        ([{"type": "audio", "audio": "x"}], "text, image_url and file parts"),
        ([{"type": "text", "text": "many"}] + [picture(i) for i in range(images.MAX_IMAGES + 1)], "at most 8"),
        (
            [{"type": "image_url", "image_url": {"url": "data:image/x-eps;base64," + base64.b64encode(EPS).decode()}}],
            "not an image",
        ),
    ],
)
def test_bad_image_input_gets_a_clear_error_and_touches_no_session(gemma3_vision, content, needle):
    before = gemma3_vision.cache_info()["sessions"]
    with pytest.raises(ValueError, match=needle):
        gemma3_vision.stream_chat([{"role": "user", "content": content}], session_id="bad")
    assert gemma3_vision.cache_info()["sessions"] == before


def test_images_over_the_size_limits_are_refused(gemma3_vision, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(ValueError, match="at most"):
        gemma3_vision.request(ask(png(picture(0))))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="million pixels"):
        gemma3_vision.request(ask(picture(0)))


def test_an_image_for_a_text_model_or_outside_a_user_message_is_refused(gemma3, gemma3_vision):
    with pytest.raises(ValueError, match="reads text only"):
        gemma3.request(ask(picture(0)))
    system = [{"role": "system", "content": [picture(0)]}, {"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="only user messages"):
        gemma3_vision.request(system)


def test_a_remote_upstream_is_sent_images_as_data_urls(gemma3_vision):
    message = gemma3_vision.request(ask(picture(7))).messages[0]
    sent = openai_message(message)
    assert sent["content"][0] == {"type": "text", "text": "What is this?"}
    url = sent["content"][1]["image_url"]["url"]
    assert images.read(url, "x").digest == message["content"][1].digest


@pytest.fixture(scope="module")
def vision_api(gemma3_vision_dir, gemma3_dir):
    registry = ModelRegistry([str(gemma3_vision_dir), str(gemma3_dir)], max_cache_bytes=2**28)
    registry.switch(registry.ids[0])
    servers = {}
    for urls in (False, True):
        config = app.AppConfig(port=free_port(), image_urls=urls)
        servers[urls] = (app.serve(config, registry, prevent_thread_lock=True, quiet=True), config.port)
    yield registry, {urls: f"http://127.0.0.1:{port}/v1" for urls, (_, port) in servers.items()}
    for demo, _ in servers.values():
        demo.close()


def _chat(base, content, model=None):
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=8
    )


def test_v1_takes_image_url_parts_and_fetches_http_urls_only_when_allowed(vision_api):
    registry, bases = vision_api
    registry.switch(registry.ids[0])
    image = picture(8)
    body = png(image)

    class One(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), One)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    try:
        parts = [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": data_url(image)}},
        ]
        by_data = _chat(bases[False], parts).choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="--image-urls"):
            _chat(bases[False], [parts[0], {"type": "image_url", "image_url": {"url": url}}])
        by_url = _chat(bases[True], [parts[0], {"type": "image_url", "image_url": {"url": url}}])
        assert by_url.choices[0].message.content == by_data == reply(registry.get(), ask(image))[0]
    finally:
        server.shutdown()


def test_a_chunked_body_over_the_limit_is_a_413_before_it_is_read_whole(vision_api, monkeypatch):
    import httpx

    from llm_backends import http_api

    _, bases = vision_api
    monkeypatch.setattr(http_api, "MAX_BODY_BYTES", 4096)

    def body():
        for _ in range(64):
            yield b" " * 1024

    response = httpx.post(
        f"{bases[False]}/chat/completions", content=body(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413 and "over" in response.json()["error"]["message"]
    assert "content-length" not in {k.lower() for k in response.request.headers}


def test_v1_refuses_an_image_for_a_text_model_with_a_400(vision_api):
    registry, bases = vision_api
    text_model = registry.ids[1]
    registry.switch(text_model)
    try:
        parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": data_url(picture(0))}}]
        with pytest.raises(openai.BadRequestError, match="reads text only"):
            _chat(bases[False], parts, model=text_model)
    finally:
        registry.switch(registry.ids[0])


def test_the_prompt_and_the_greedy_answer_match_transformers_own_processor_and_generate(gemma3_vision_dir):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llm_backends import load_model

    ours = load_model(str(gemma3_vision_dir), quantization="none", max_cache_bytes=2**26)
    image, question = picture(9), "What is in this picture?"
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    ids = ours.render(ours.request(messages).messages)
    processor = AutoProcessor.from_pretrained(gemma3_vision_dir)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(text=text, images=[image], return_tensors="pt", add_special_tokens=False)
    image_id = processor.tokenizer.image_token_id
    assert [image_id if t < 0 else t for t in ids] == inputs["input_ids"][0].tolist()
    reference = AutoModelForImageTextToText.from_pretrained(gemma3_vision_dir, dtype=torch.float32).eval()
    expected = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    params = ours.request(messages, temperature=0, max_new_tokens=8).sampling
    pictures = {p.key: p for p in images.images_of(ours.request(messages).messages)}
    answer = list(ours.engine.generate(ids, ours.engine.new_entry(), params, images=pictures))
    assert answer == expected[: len(answer)] and len(answer) >= 4


def test_tool_results_after_a_message_with_images_render_for_a_template_without_tools(gemma3_vision):
    messages = [*ask(picture(0)), {"role": "tool", "tool_call_id": "1", "content": "42"}]
    ids = gemma3_vision.render(gemma3_vision.request(messages).messages)
    assert sum(t < 0 for t in ids) == 4


def test_a_session_with_an_image_resumes_from_the_disk_tier_with_the_images_tokens(gemma3_vision_dir, tmp_path):
    from llm_backends import load_model

    first = ask(picture(11))
    model = load_model(str(gemma3_vision_dir), max_cache_bytes=2**26, cache_dir=str(tmp_path))
    answer, _ = reply(model, first, "disk")
    model.release()  # written to disk, gone from memory
    again = load_model(str(gemma3_vision_dir), max_cache_bytes=2**26, cache_dir=str(tmp_path))
    follow = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "More?"}]
    resumed, stats = reply(again, follow, "disk")
    image_end = max(i for i, t in enumerate(again.render(again.request(first).messages)) if t < 0)
    assert stats.cache_tier == "disk" and stats.cached_tokens > image_end
    assert resumed == reply(again, follow)[0]


def test_a_repetition_penalty_reads_only_the_texts_tokens(gemma3_vision):
    chunks = list(gemma3_vision.stream_chat(ask(picture(12)), temperature=0, max_new_tokens=6, repetition_penalty=1.3))
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].stats.completion_tokens > 0


def test_too_many_images_are_refused_before_any_is_read(gemma3_vision, monkeypatch):
    reads = []
    monkeypatch.setattr(images, "read", lambda *a, **k: reads.append(a))
    many = [{"type": "image_url", "image_url": {"url": "data:,"}}] * (images.MAX_IMAGES + 1)
    with pytest.raises(ValueError, match="at most 8"):
        gemma3_vision.request([{"role": "user", "content": many}])
    assert reads == []


def test_a_large_image_is_kept_small_and_named_by_its_full_pixels():
    wide = picture(13, size=(100, 3000))
    kept = images.read(wide, "x")
    assert kept.pixels.size == (images.MAX_SIDE, 68) and wide.size == (3000, 100)
    assert kept.digest != images.read(wide.resize((2048, 68)), "x").digest


def test_two_images_whose_keys_collide_are_refused():
    first, second = images.read(picture(14), "a"), images.read(picture(15), "b")
    twin = images.Image(second.pixels, first.digest[:12] + second.digest[12:])
    assert twin.key == first.key
    with pytest.raises(ValueError, match="share a key"):
        images.by_key([first, twin])
    assert images.by_key([first, first]) == {first.key: first}


def test_a_cache_that_ends_inside_an_image_reads_the_image_again_whole(tmp_path):
    from llm_backends import load_model
    from tiny_models import build_gemma3_vision

    model = load_model(str(build_gemma3_vision(tmp_path / "wide", sliding_window=512)), max_cache_bytes=2**26)
    request = model.request(ask(picture(16)), temperature=0, max_new_tokens=6)
    prompt = model.render(request.messages)
    start = min(i for i, t in enumerate(prompt) if t < 0)
    pictures = images.by_key(images.images_of(request.messages))
    entry = model.engine.new_entry()
    fresh = list(model.engine.generate(prompt, entry, request.sampling, images=pictures))
    entry.trim(start + 2)  # two of the image's four tokens left in the cache
    assert entry.ids == prompt[: start + 2]
    run = model.engine.generate(prompt, entry, request.sampling, images=pictures)
    assert list(run) == fresh and run.cached_tokens == start


def test_nf4_quantizes_the_language_model_and_keeps_the_vision_tower_as_it_is(gemma3_vision_dir):
    from llm_backends import load_model

    model = load_model(str(gemma3_vision_dir), quantization="nf4", device="cpu", max_cache_bytes=2**26)
    net = model.model
    kinds = {name: type(p).__name__ for name, p in net.named_parameters()}
    tower = [k for name, k in kinds.items() if "vision_tower" in name or "multi_modal_projector" in name]
    text = [k for name, k in kinds.items() if "language_model" in name and "proj" in name]
    assert tower and "Params4bit" not in tower
    assert text and set(text) == {"Params4bit"}
    assert next(net.model.vision_tower.parameters()).dtype == torch.bfloat16
    answer, stats = reply(model, ask(picture(17)))
    assert stats.completion_tokens > 0
