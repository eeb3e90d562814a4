"""Documents in a message (text files, code, PDFs): read into text once at the door, the same for every door."""

from __future__ import annotations

import base64
import io
import json

import pytest

from llm_backends import documents
from llm_backends.request import check_messages


@pytest.fixture(autouse=True)
def nothing_kept_read(monkeypatch):
    """Each test starts with no PDF kept read (the module keeps them for the process)."""
    monkeypatch.setattr(documents, "_texts", type(documents._texts)())
    monkeypatch.setattr(documents, "_texts_chars", 0)


def pdf(*pages: str) -> bytes:
    """A small PDF with one line of Helvetica text per page ("" for a page without text)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET" if text else ""
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {len(objects)} 0 R >>"
        )
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    table, start = "".join(f"{offset:010d} 00000 n \n" for offset in offsets), len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n{table}".encode()
    return out + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{start}\n%%EOF\n".encode()


def locked(data: bytes, user_password: str, algorithm: str = "RC4-128") -> bytes:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=io.BytesIO(data))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def file_part(name: str, data: bytes, as_url: bool = True) -> dict:
    sent = "data:application/octet-stream;base64," + base64.b64encode(data).decode() if as_url else data
    return {"type": "file", "file": {"filename": name, "file_data": sent}}


def asked(*parts) -> str:
    return check_messages([{"role": "user", "content": list(parts)}])[0]["content"]


def test_a_text_file_reads_as_its_name_and_text_set_apart_from_the_message():
    notes = "Line one\r\nA fence: ``` and ````\r\n"
    text = asked(
        {"type": "text", "text": "Summarise:"},
        file_part("../../home/ann/notes.md", notes.encode()),
        {"type": "text", "text": "Be brief."},
    )
    assert text == "Summarise:\n\nFile: notes.md\n`````\nLine one\nA fence: ``` and ````\n`````\n\nBe brief."
    assert asked(file_part("a.txt", "héllo".encode("utf-16"), as_url=False)) == "File: a.txt\n```\nhéllo\n```"
    assert asked(file_part("a.txt", b"\xef\xbb\xbfhi")) == "File: a.txt\n```\nhi\n```", "a UTF-8 BOM is not text"
    assert asked(file_part("Makefile", b"all:\n\tcc x.c\n")).startswith("File: Makefile\n```\nall:\n\tcc x.c\n```")
    assert (
        asked(file_part("a\nb.txt", b"x"), file_part("", b"y"))
        == "File: a b.txt\n```\nx\n```\n\nFile: file\n```\ny\n```"
    )
    assert asked(file_part("dos.txt", b"old\r\nfile\x1a")) == "File: dos.txt\n```\nold\nfile\n```", "DOS's end mark"
    blank = {"type": "text", "text": ""}
    after = asked(file_part("a.txt", b"x"), blank, {"type": "text", "text": "next"})
    assert after == "File: a.txt\n```\nx\n```\n\nnext", "an empty part between does not glue the text to the fence"
    before = asked({"type": "text", "text": "intro\n"}, file_part("a.txt", b"x"))
    assert before == "intro\n\nFile: a.txt\n```\nx\n```", "a blank line, not more"


def test_a_name_is_one_line_of_at_most_200_bytes_keeping_its_extension():
    name = documents.clean_name("C:\\docs\\" + "報告" * 100 + ".pdf")
    assert name.endswith(".pdf") and name.startswith("報告") and len(name.encode()) <= documents.MAX_NAME_BYTES
    assert documents.clean_name("..") == documents.clean_name(".") == documents.clean_name(None) == "file"
    assert documents.clean_name("x/.env") == ".env" and documents.clean_name("a" * 300).startswith("a" * 200)


def test_a_pdf_reads_as_the_text_of_its_pages_and_an_owner_password_alone_does_not_stop_it():
    document = pdf("The ocean is deep.", "", "Page three holds 42.")
    text = asked(file_part("report.pdf", document), {"type": "text", "text": "What number?"})
    assert text == (
        "File: report.pdf\n```\n[page 1]\nThe ocean is deep.\n\n[page 3]\nPage three holds 42.\n```\n\nWhat number?"
    )
    assert asked(file_part("r.pdf", locked(document, ""))) == asked(file_part("r.pdf", document))
    assert asked(file_part("r.pdf", locked(document, "", "AES-128"))) == asked(file_part("r.pdf", document))


@pytest.mark.parametrize(
    "part, needle",
    [
        (file_part("a.bin", bytes(range(256))), r"\(a.bin\) is not a text file, a PDF or an image"),
        (file_part("late.txt", b"a" * 70_000 + b"\x00\x01"), r"\(late.txt\) is not a text file"),
        (file_part("p.png", b"\x89PNG\r\n\x1a\n" + bytes(32)), r"\(p.png\) is an image: send it as an image_url part"),
        (file_part("w.txt", b"\xff\xfe\x00\xd8"), r"\(w.txt\) is not UTF-16-LE text"),
        (file_part("a.txt", "café".encode("latin-1")), r"\(a.txt\) is not UTF-8 text \(byte 3\); save it as UTF-8"),
        (file_part("a.txt", b" \n\t"), r"\(a.txt\) is empty"),
        (file_part("x.pdf", b"%PDF-1.4 broken"), r"\(x.pdf\) is a PDF that cannot be read"),
        (file_part("scan.pdf", pdf("")), r"\(scan.pdf\) is a PDF without text \(a scan\?\)"),
        (file_part("l.pdf", locked(pdf("secret"), "pw")), r"\(l.pdf\) is a PDF locked with a password"),
        (file_part("big.txt", b"a" * (documents.MAX_TEXT_CHARS + 1)), "holds more than 524,288 characters of text"),
        (file_part("huge.txt", b"a" * (documents.MAX_FILE_BYTES + 1), as_url=False), "files may be at most 16 MiB"),
        ({"type": "file", "file": {"file_id": "file-abc"}}, "no Files API to look a file_id up in; send file_data"),
        ({"type": "file", "file": {"file_data": "https://example.com/a.txt"}}, "must be a base64 data: URL"),
        ({"type": "file", "file": {"file_data": 5}}, "file_data must be a base64 data: URL, not int"),
        ({"type": "file", "file": "a.txt"}, r"\.file must be an object with filename and file_data"),
    ],
)
def test_a_file_that_cannot_be_read_gets_an_error_naming_it_and_why(part, needle):
    with pytest.raises(ValueError, match=needle):
        asked(part)


def test_files_only_in_user_messages_and_too_many_are_refused_before_any_is_read(monkeypatch):
    with pytest.raises(ValueError, match="only user messages may hold files"):
        check_messages(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [file_part("a.txt", b"x")]}]
        )
    read = []
    monkeypatch.setattr(documents, "read", lambda *args, **kwargs: read.append(args) or "")
    many = [file_part(f"{n}.txt", b"x") for n in range(documents.MAX_FILES + 1)]
    with pytest.raises(ValueError, match=f"holds {documents.MAX_FILES + 1} files; at most {documents.MAX_FILES}"):
        check_messages([{"role": "user", "content": many}])
    assert read == [], "counted before any was read"


def test_a_pdf_is_parsed_once_per_person_while_their_chat_keeps_sending_it(monkeypatch):
    """Kept read by owner: another person sending the same file waits as long as the first did, so the reply's
    timing tells them nothing about what the first one sent."""
    import pypdf

    opened = []
    real = pypdf.PdfReader
    monkeypatch.setattr(pypdf, "PdfReader", lambda stream: opened.append(1) or real(stream))
    message = [{"role": "user", "content": [file_part("once.pdf", pdf("Read me once, a unique line 7f3a."))]}]
    for _ in range(3):
        check_messages(message, owner=("page", "ann"))
    assert len(opened) == 1
    check_messages(message, owner=("page", "bob"))
    check_messages(message, owner=("api", "ann"))
    assert len(opened) == 3, "each person's, and each door's, copy is read for them"
    check_messages(message)
    check_messages(message)
    assert len(opened) == 5, "without an owner nothing is kept"


def test_reading_a_pdf_stops_at_its_time_budget(monkeypatch):
    monkeypatch.setattr(documents, "MAX_PDF_SECONDS", 0.0)
    with pytest.raises(ValueError, match=r"\(slow.pdf\) is a PDF that takes more than 0 s to read"):
        asked(file_part("slow.pdf", pdf("one", "two")))


def test_a_document_sits_among_a_vision_models_images_in_order():
    from llm_backends.images import Image
    from test_images import data_url, picture

    image = {"type": "image_url", "image_url": {"url": data_url(picture(1))}}
    content = asked(image, file_part("a.txt", b"x"), {"type": "text", "text": "Compare."}, image)
    assert [type(part) for part in content] == [Image, str, Image]
    assert content[1] == "File: a.txt\n```\nx\n```\n\nCompare."


def test_an_api_caller_without_a_session_name_still_has_its_pdf_kept_read(qwen3, monkeypatch):
    import pypdf

    opened = []
    real = pypdf.PdfReader
    monkeypatch.setattr(pypdf, "PdfReader", lambda stream: opened.append(1) or real(stream))
    message = [{"role": "user", "content": [file_part("r.pdf", pdf("Read once."))]}]
    for _ in range(2):
        qwen3.create(message, temperature=0, max_tokens=1)
    assert len(opened) == 1


def test_a_file_gives_the_model_what_its_text_pasted_would_and_a_follow_up_reuses_its_tokens(qwen3):
    code = "def add(a, b):\n    return a + b\n"
    with_file = [{"role": "user", "content": [file_part("add.py", code.encode()), {"type": "text", "text": "Why?"}]}]
    pasted = [{"role": "user", "content": "File: add.py\n```\n" + code.strip("\n") + "\n```\n\nWhy?"}]
    first = qwen3.create(with_file, temperature=0, max_tokens=8, user="doc")
    fresh = qwen3.create(pasted, temperature=0, max_tokens=8, user="pasted")
    assert first["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]
    assert first["usage"]["prompt_tokens"] == fresh["usage"]["prompt_tokens"]
    follow = [*with_file, first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
    second = qwen3.create(follow, temperature=0, max_tokens=8, user="doc")
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1


def test_the_page_sends_an_attached_document_as_a_file_part_exports_it_and_imports_it_back(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # attached files are in Gradio's upload folder
    import app
    import chat_history

    upload = tmp_path / "abc" / "plan.txt"
    upload.parent.mkdir()
    upload.write_text("Step 1: tea.\n")
    page = [
        {"role": "user", "content": [{"path": str(upload)}, "What is step 1?"]},
        {"role": "assistant", "content": "Tea."},
    ]
    for images in (True, False):  # a model that reads text only reads documents too
        sent = app.to_messages("", page, "More?", images=images)
        assert sent[0]["content"][0] == {
            "type": "file",
            "file": {"filename": "plan.txt", "file_data": b"Step 1: tea.\n"},
        }
        assert check_messages(sent)[0]["content"] == "File: plan.txt\n```\nStep 1: tea.\n```\n\nWhat is step 1?"
    body = json.loads(chat_history.export_chat({"messages": page, "settings": {}}, app.exported_part))
    part = body["messages"][0]["content"][0]
    assert part["file"]["filename"] == "plan.txt" and part["file"]["file_data"].startswith("data:text/plain;base64,")
    title, messages, _ = chat_history.import_chat(
        json.dumps(body), {}, app.imported_image, store_file=app.imported_file, max_files=documents.MAX_FILES
    )
    stored = chat_history.files_of(messages[0]["content"])[0]
    assert stored.endswith("/plan.txt") and app.page_file(stored) and app.exported_part(stored) == part
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\] \(x.bin\) is not a text file"):
        chat_history.import_chat(
            json.dumps([{"role": "user", "content": [file_part("x.bin", bytes(9))]}]),
            {},
            None,
            store_file=app.imported_file,
        )
    with pytest.raises(ValueError, match="holds 2 files; at most 1 can be imported"):
        chat_history.import_chat(
            json.dumps([{"role": "user", "content": [part, part]}]), {}, None, store_file=app.imported_file, max_files=1
        )
    upload.unlink()
    assert app.to_messages("", page, "More?")[0]["content"][0] == {
        "type": "text",
        "text": "[plan.txt: a file no longer on this server]",
    }


def test_the_page_refuses_a_chat_naming_too_many_files_before_reading_any_and_reads_each_once(tmp_path, monkeypatch):
    """The browser hands the chat over: it could name one large upload a thousand times."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    import app

    upload = tmp_path / "abc" / "big.txt"
    upload.parent.mkdir()
    upload.write_text("words " * 1000)
    reads = []
    real = app.attached_part
    monkeypatch.setattr(app, "attached_part", lambda path, images=True: reads.append(path) or real(path, images))
    same = [{"role": "user", "content": [{"path": str(upload)}, "Again?"]}, {"role": "assistant", "content": "Yes."}]
    sent = app.to_messages("", same * 3, "More?")
    assert len(reads) == 1 and len(sent) == 7, "a file named in three turns is read once"
    app.check_attached(same * app.MAX_ATTACHED)
    with pytest.raises(ValueError, match=f"holds {app.MAX_ATTACHED + 1} attached files; at most {app.MAX_ATTACHED}"):
        app.check_attached(same * (app.MAX_ATTACHED + 1))


def test_an_imported_document_is_stored_under_its_name_at_a_place_that_does_not_tell_its_content(tmp_path):
    import hashlib

    import app

    long_name = "報告" * 100 + ".md"
    path = app.imported_file({"filename": long_name, "file_data": b"# Plan\n"}, "messages[0].content[0]")
    stored = app.page_file(path)
    assert stored and stored.read_bytes() == b"# Plan\n" and stored.name == documents.clean_name(long_name)
    assert hashlib.sha256(b"# Plan\n").hexdigest()[:32] not in path, "keyed by this process, not by content alone"
    again = app.imported_file({"filename": "..", "file_data": b"# Plan\n"}, "messages[0].content[0]")
    assert again == str(stored.parent / "file")
