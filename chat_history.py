"""Saved chats as the page keeps them in the browser, and their export to (import from) OpenAI's messages.

A chat record is plain JSON: ``{"title", "named", "messages", "settings", "forks", "updated", "v"}`` under its id
(``v``: the record's version, the server's clock in µs when it was last written: exact in JavaScript's numbers),
where ``messages`` are the chat's messages as the page shows them (thinking, stats and notices included, as titled
messages), ``settings`` the page's controls for it (system prompt, sampling) and ``forks`` its earlier versions
(``fork``). A user message's images are file parts
(paths in the server's upload folder). The export is what another tool reads: ``{"title", "messages": [OpenAI
messages, system prompt first], "settings"}`` with images as ``image_url`` data: URLs; an import takes that, or a
bare list of OpenAI messages.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

MAX_CHATS = 200  # the oldest are dropped beyond this, or beyond MAX_STORED_BYTES
# A browser keeps ~5 MB per site, and Gradio stores the chats encrypted and base64-encoded (a third larger): past
# that every later save would fail without a word, so the oldest chats go first.
MAX_STORED_BYTES = 3 * 2**20
MAX_IMPORT_BYTES = 16 * 2**20  # room for a few images as data: URLs
MAX_TITLE = 80
CHAT_ID = re.compile(r"[0-9a-f]{32}")
ROLES = ("system", "user", "assistant")


_last_version = 0
_version_lock = threading.Lock()


def _version() -> int:
    """A record's version: this server's clock in µs, and always above the last one given (two saves in one µs
    are still ordered)."""
    global _last_version
    with _version_lock:
        _last_version = max(time.time_ns() // 1000, _last_version + 1)
        return _last_version


def new_chat_id() -> str:
    return uuid.uuid4().hex


def valid_chat_id(value) -> str | None:
    """The id if it is one this page made (the browser sends it back; anything else is ignored)."""
    return value if isinstance(value, str) and CHAT_ID.fullmatch(value) else None


def text_of(content) -> str:
    """A message's text: content arrives as a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        text = content.get("text", "") if content.get("type", "text") == "text" else ""
        return text if isinstance(text, str) else ""  # the browser's saved copy may hold anything
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def files_of(content) -> list[str]:
    """The paths of a page message's files, in order (Gradio gives them as ``{"path"}`` dicts, or as
    ``{"type": "file", "file": {"path"}}`` parts once they have been through the chat)."""
    parts = content if isinstance(content, (list, tuple)) else [content]
    paths = []
    for part in parts:
        if isinstance(part, dict) and part.get("type") == "file" and isinstance(part.get("file"), dict):
            part = part["file"]
        if isinstance(part, dict) and isinstance(part.get("path"), str):
            paths.append(part["path"])
    return paths


def page_content(content, image: Callable[[str], dict | None] | None = None) -> str | list[dict]:
    """A page message's content for a model: its text, and with ``image`` (a file's path -> an OpenAI content
    part, or None to leave it out) its images first, as typed parts."""
    text = text_of(content)
    parts = [part for part in map(image, files_of(content)) if part is not None] if image else []
    if not parts:
        return text
    return [*parts, {"type": "text", "text": text}] if text else parts


def is_page_note(message: dict) -> bool:
    """Thinking, stats and notices: titled messages, the page's own, never sent back to the model."""
    metadata = message.get("metadata")
    return isinstance(metadata, dict) and bool(metadata.get("title"))


def last_answer(messages: list[dict]) -> tuple[int, int] | None:
    """Where the chat's last reply begins (after its user message) and the index of its answer, where the chat
    ends with an answer (only page notes after it); None otherwise."""
    at = len(messages) - 1
    while at >= 0 and is_page_note(messages[at]):
        at -= 1
    if at < 0 or messages[at].get("role") != "assistant":
        return None
    start = at
    while start > 0 and messages[start - 1].get("role") != "user":
        start -= 1
    if start == 0 or any(not is_page_note(m) for m in messages[start:at]):
        return None
    return start, at


def title_for(messages: list[dict]) -> str:
    first = next((text_of(m.get("content")) for m in messages if m.get("role") == "user"), "")
    words = " ".join(first.split())
    return (words[: MAX_TITLE - 1] + "…" if len(words) > MAX_TITLE else words) or "New chat"


def saved(chats: dict | None) -> dict:
    """The browser's chats as stored, with anything malformed (an old or edited entry) left out."""
    if not isinstance(chats, dict):
        return {}
    return {
        key: record
        for key, record in chats.items()
        if valid_chat_id(key) and isinstance(record, dict) and isinstance(record.get("messages"), list)
    }


def record_of(chats: dict | None, chat_id) -> dict | None:
    """The saved record of the chat ``chat_id`` (None where it is not one this page made, or not saved)."""
    return saved(chats).get(valid_chat_id(chat_id) or "")


def upsert(
    chats: dict | None,
    chat_id: str,
    messages: list[dict],
    settings: dict,
    title: str | None = None,
    forks: list[dict] | None = None,
) -> dict:
    """The chats with ``chat_id`` saved (created or updated); the oldest beyond MAX_CHATS go. A chat is named
    after its first message until it is given a name (``title``, or ``rename``). ``forks``: its earlier versions
    (None: those saved before that still fit ``messages``, e.g. after a new turn or an undo); the oldest go beyond
    MAX_VERSION_BYTES."""
    chats = saved(chats)
    previous = chats.get(chat_id, {})
    named = bool(title) or bool(previous.get("named"))
    forks = within_budget(forks_of(previous, messages) if forks is None else forks)
    chats[chat_id] = {
        "title": title or (previous.get("title") if named else None) or title_for(messages),
        "named": named,
        "messages": messages,
        "settings": settings,
        **({"forks": forks} if forks else {}),
        "updated": time.time(),
        "v": _version(),
    }
    sizes = {key: len(json.dumps(record, ensure_ascii=False).encode()) for key, record in chats.items()}
    total = sum(sizes.values())
    for old in sorted(chats, key=lambda key: chats[key].get("updated", 0)):
        if len(chats) <= MAX_CHATS and total <= MAX_STORED_BYTES or old == chat_id:
            break
        total -= sizes[old]
        del chats[old]
    return chats


# Versions. Retrying a reply or editing a message sets the chat's tail from that user message on aside as an
# earlier version of it (ChatGPT's and Open WebUI's "< 2/3 >"). A fork is ``{"at", "before", "after"}``: the index
# of the user message where versions part, and the tails shown before and after the one in ``messages``, each
# ``{"messages": tail, "forks": the forks within it}`` (indices count from the chat's start, so they hold again
# when the tail comes back); right after a retry or an edit, ``"replaced"`` says which of ``before`` it replaced.
# A record's forks are ordered by ``at``, one per index.
MAX_VERSIONS = 16  # per fork, the oldest dropped beyond
# Every version is stored whole, in the browser's ~5 MB: a chat's versions take at most this (JSON), the oldest
# dropped first (all saved chats together still yield to MAX_STORED_BYTES, the oldest chat first).
MAX_VERSION_BYTES = 512 * 2**10
MAX_FORK_DEPTH = 128  # forks within versions within forks...: deeper ones in the browser's copy are left out


def forks_of(record: dict | None, messages: list | None = None) -> list[dict]:
    """A record's forks that are well formed and fit ``messages`` (by default its own): each at a user message
    whose messages up to it are those the record holds, with tails of page messages that begin with a user
    message. The browser's copy may hold anything; the rest are left out (all of them where ``messages`` hold
    anything but user and assistant messages, which the chat would not show at the same places)."""
    record = record if isinstance(record, dict) else {}
    held = record.get("messages") if isinstance(record.get("messages"), list) else []
    messages = held if messages is None else messages
    if not _chat_messages(messages):
        return []
    forks = _clean_forks(record.get("forks"), messages)
    if messages is not held:  # the same chat only where the messages up to each fork are unchanged
        same = 0
        while same < min(len(held), len(messages)) and _same(held[same], messages[same]):
            same += 1
        forks = [f for f in forks if f["at"] < same]
    return forks


def _same(a, b) -> bool:
    """Whether two page messages say the same (the page may hand back a saved message in another shape)."""
    key = lambda m: (m.get("role"), text_of(m.get("content")), files_of(m.get("content")), is_page_note(m))  # noqa: E731
    return isinstance(a, dict) and isinstance(b, dict) and key(a) == key(b)


def _chat_messages(messages) -> bool:
    return isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in ("user", "assistant") for m in messages
    )


def _is_user(messages: list, at) -> bool:
    return type(at) is int and 0 <= at < len(messages) and messages[at].get("role") == "user"


def _clean_forks(forks, messages: list, floor: int = -1, depth: int = 0) -> list[dict]:
    clean = []
    for fork in forks if isinstance(forks, list) and depth < MAX_FORK_DEPTH else ():
        if not isinstance(fork, dict) or not _is_user(messages, fork.get("at")) or fork["at"] <= floor:
            continue
        at = fork["at"]
        sides = []
        for side in ("before", "after"):
            tails = []
            for tail in fork.get(side) if isinstance(fork.get(side), list) else ():
                if not isinstance(tail, dict) or not _chat_messages(tail.get("messages")):
                    continue
                if not _is_user(tail["messages"], 0):
                    continue
                inner = tail.get("forks")
                inner = _clean_forks(inner, messages[:at] + tail["messages"], at, depth + 1) if inner else []
                tails.append({"messages": tail["messages"], "forks": inner})
            sides.append(tails)
        if sides[0] or sides[1]:
            clean.append({"at": at, "before": sides[0], "after": sides[1]})
            replaced = fork.get("replaced")
            if type(replaced) is int and 0 <= replaced < len(sides[0]) and len(sides[0]) == len(fork["before"]):
                clean[-1]["replaced"] = replaced
            floor = at
    return clean


def has_answer(messages: list) -> bool:
    return any(isinstance(m, dict) and m.get("role") == "assistant" and not is_page_note(m) for m in messages)


def fork(messages: list[dict], forks: list[dict], at: int) -> list[dict]:
    """The forks once the chat's tail from ``at`` (a user message about to be retried or edited) is set aside as
    an earlier version; the new one, about to be written, comes last. A tail without an answer is not kept. Beyond
    MAX_VERSIONS the oldest go, never the one set aside (a failed reply shows it again)."""
    tail, same = messages[at:], next((f for f in forks if f["at"] == at), None)
    kept = [{"messages": tail, "forks": [f for f in forks if f["at"] > at]}]
    kept = kept if _is_user(messages, at) and has_answer(tail) else []
    earlier = same["before"] if same else []
    before = [*earlier, *kept, *(same["after"] if same else [])]
    replaced = len(earlier) if kept else None
    while len(before) > MAX_VERSIONS - 1:
        drop = 1 if replaced == 0 else 0
        before = before[:drop] + before[drop + 1 :]
        replaced = replaced - 1 if replaced is not None and drop < replaced else replaced
    outer = [f for f in forks if f["at"] < at]
    if not before:
        return outer
    parted = {"at": at, "before": before, "after": []}
    return [*outer, {**parted, "replaced": replaced} if replaced is not None else parted]


def switch(messages: list[dict], forks: list[dict], at: int, step: int) -> tuple[list[dict], list[dict]]:
    """The chat showing the version before (``step`` -1) or after (+1) the shown one at fork ``at``, and its
    forks. Raises ValueError where there is none that way."""
    fork = next((f for f in forks if f["at"] == at), None)
    if fork is None or not fork["before" if step < 0 else "after"]:
        raise ValueError("no other version that way")
    shown = {"messages": messages[at:], "forks": [f for f in forks if f["at"] > at]}
    if step < 0:
        chosen, before, after = fork["before"][-1], fork["before"][:-1], [shown, *fork["after"]]
    else:
        chosen, before, after = fork["after"][0], [*fork["before"], shown], fork["after"][1:]
    outer = [f for f in forks if f["at"] < at]
    parted = {"at": at, "before": before, "after": after}
    return [*messages[:at], *chosen["messages"]], [*outer, parted, *chosen["forks"]]


def drop_shown(messages: list[dict], forks: list[dict], at: int) -> tuple[list[dict], list[dict]] | None:
    """The chat with the version shown at fork ``at`` dropped (a retry or edit that failed) and the one it replaced
    shown again, in its place among the others; None where the fork has no earlier version."""
    fork = next((f for f in forks if f["at"] == at), None)
    if fork is None or not fork["before"]:
        return None
    place = fork.get("replaced", len(fork["before"]) - 1)
    chosen = fork["before"][place]
    parted = {"at": at, "before": fork["before"][:place], "after": fork["before"][place + 1 :] + fork["after"]}
    outer = [f for f in forks if f["at"] < at]
    kept = [parted] if parted["before"] or parted["after"] else []
    return [*messages[:at], *chosen["messages"]], [*outer, *kept, *chosen["forks"]]


def within_budget(forks: list[dict], budget: int = MAX_VERSION_BYTES) -> list[dict]:
    """The forks with their oldest versions dropped until they take at most ``budget`` bytes as JSON: the first
    fork's oldest first, never the version a retry or edit has just set aside, and within versions (their own
    forks) where nothing else is left to drop."""
    while forks and (size := _size(forks)) > budget:
        while size > budget:  # sizes estimated drop by drop, then measured again
            dropped = _drop_oldest(forks)
            if dropped is None:
                return forks
            forks, freed = dropped
            size -= freed
    return forks


def _size(value) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode())


def _drop_oldest(forks: list[dict]) -> tuple[list[dict], int] | None:
    """(the forks without their oldest droppable version, about how many bytes that frees); None if none is."""
    for i, fork in enumerate(forks):
        replaced = fork.get("replaced")
        places = [("before", j) for j in range(len(fork["before"])) if j != replaced]
        for side, j in [*places, *(("after", j) for j in reversed(range(len(fork["after"]))))]:
            parted = {**fork, side: fork[side][:j] + fork[side][j + 1 :]}
            if side == "before" and replaced is not None and j < replaced:
                parted["replaced"] = replaced - 1
            rest = [parted] if parted["before"] or parted["after"] else []
            return [*forks[:i], *rest, *forks[i + 1 :]], _size(fork[side][j]) + 1
    for i, fork in enumerate(forks):
        for side in ("before", "after"):
            for j, tail in enumerate(fork[side]):
                inner = _drop_oldest(tail["forks"]) if tail["forks"] else None
                if inner is not None:
                    tails = [*fork[side][:j], {"messages": tail["messages"], "forks": inner[0]}, *fork[side][j + 1 :]]
                    return [*forks[:i], {**fork, side: tails}, *forks[i + 1 :]], inner[1]
    return None


def versions(forks: list[dict], at: int | None = None) -> tuple[int, int, int] | None:
    """(``at``, which version is shown from 1, how many) of the fork at ``at``, or of the chat's last fork where
    there is none at ``at``; None without forks."""
    if not forks:
        return None
    fork = next((f for f in forks if f["at"] == at), forks[-1])
    return fork["at"], len(fork["before"]) + 1, len(fork["before"]) + len(fork["after"]) + 1


def rename(chats: dict | None, chat_id: str, title: str) -> dict:
    """Raises ValueError for an empty or too long title, or a chat that is not saved."""
    chats = saved(chats)
    title = " ".join(str(title or "").split())
    if not title:
        raise ValueError("a chat's name cannot be empty")
    if len(title) > MAX_TITLE:
        raise ValueError(f"a chat's name has at most {MAX_TITLE} characters")
    if chat_id not in chats:
        raise ValueError("open a saved chat first (a chat is saved once it has a message)")
    chats[chat_id] = {**chats[chat_id], "title": title, "named": True, "v": _version()}
    return chats


def delete(chats: dict | None, chat_id: str | None) -> dict:
    chats = saved(chats)
    chats.pop(chat_id, None)
    return chats


def changes(before: dict | None, after: dict | None) -> list[list]:
    """What a step did to the saved chats, as ``[id, record, version]`` (record None: deleted), for the page's
    other tabs: each keeps the newest version of each chat it has heard of, so a copy that missed a change
    (taken before it arrived) never undoes it, and a chat missing from a copy is never taken as deleted."""
    before, after = saved(before), saved(after)
    put = [[key, record, record.get("v", 0)] for key, record in after.items() if before.get(key) != record]
    # A removal carries the removed record's version: a newer one saved meanwhile elsewhere (unseen by a stale copy
    # that trimmed it away) survives it.
    return put + [[key, None, before[key].get("v", 0)] for key in before if key not in after]


def choices(chats: dict | None) -> list[tuple[str, str]]:
    """(title, id) pairs, the most recently used first."""
    chats = saved(chats)
    ordered = sorted(chats, key=lambda key: chats[key].get("updated", 0), reverse=True)
    return [(str(chats[key].get("title") or "New chat"), key) for key in ordered]


MAX_FOUND = 20  # chats a search lists
MAX_SEARCH_WORDS = 8  # words of a query looked for (each at most MAX_SEARCH_WORD characters): a query's cost is
MAX_SEARCH_WORD = 64  # a pass over every saved chat per word, and the server may be handed any query


def search_index(chats: dict | None) -> list[tuple[str, str, str]]:
    """What a search reads of the saved chats, the most recently used first: (title, id, the text of its
    messages, page notes and thinking left out, spaces collapsed), at most MAX_STORED_BYTES characters of text
    in all (what the browser may hold; the rest of a larger one is not searched)."""
    chats, index, left = saved(chats), [], MAX_STORED_BYTES
    for title, chat_id in choices(chats):
        messages = [m for m in chats[chat_id]["messages"] if isinstance(m, dict) and not is_page_note(m)]
        body = " ".join(" ".join(text_of(m.get("content")) for m in messages).split())[: max(0, left)]
        left -= len(body)
        index.append((title, chat_id, body))
    return index


def search(chats: dict | None, query: str, limit: int = MAX_FOUND) -> list[tuple[str, str]]:
    """(label, id) pairs of the saved chats whose title or messages' text (page notes and thinking left out)
    contains each word of ``query`` (``find`` over ``search_index``)."""
    return find(search_index(chats), query, limit)


def find(index, query: str, limit: int = MAX_FOUND) -> list[tuple[str, str]]:
    """(label, id) pairs of the chats in ``index`` (``search_index``) whose title or text contains each word of
    ``query`` (any case; its first MAX_SEARCH_WORDS distinct words), in the index's order (the most recently
    used first); a label is the title, and where the words are not all in it, a few words around the first one
    it lacks."""
    words = query.casefold().split() if isinstance(query, str) else []
    words = list(dict.fromkeys(word[:MAX_SEARCH_WORD] for word in words))[:MAX_SEARCH_WORDS]
    if not words:
        return []
    found = []
    for title, chat_id, body in index or ():
        folded = title.casefold()
        haystack = f"{folded}\n{body.casefold()}"
        if not all(word in haystack for word in words):
            continue
        missing = [word for word in words if word not in folded]
        found.append((f"{title} · {_snippet(title, body, missing[0])}" if missing else title, chat_id))
        if len(found) == limit:
            break
    return found


def _snippet(title: str, body: str, word: str) -> str:
    """A few whole words of ``body`` around ``word`` (the first message left out where the title repeats it)."""
    body = body[len(title) :].lstrip() if body.startswith(title) else body
    match = re.search(re.escape(word), body, re.IGNORECASE)  # in body itself: case-folding may change lengths
    at = match.start() if match else 0
    start, end = max(0, at - 24), at + 48  # moved in to whole words
    start = body.find(" ", start, at) + 1 if start and " " in body[start:at] else start
    end = body.rfind(" ", at, end) if end < len(body) and " " in body[at:end] else end
    return ("…" if start else "") + body[start:end].strip() + ("…" if end < len(body) else "")


def openai_messages(messages: list[dict], system_prompt: str = "", image=None) -> list[dict]:
    """The conversation as OpenAI messages: the system prompt first, page notes and thinking left out; the
    users' images through ``image`` (see ``page_content``; without it they are left out)."""
    out = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    for message in messages:
        if message.get("role") in ("user", "assistant") and not is_page_note(message):
            content = page_content(message.get("content"), image if message["role"] == "user" else None)
            out.append({"role": message["role"], "content": content})
    return out


def export_chat(record: dict, image=None) -> str:
    """The chat as JSON another tool reads; ``image`` turns a file's path into an ``image_url`` or a ``file``
    part."""
    settings = dict(record.get("settings") or {})
    body = {
        "title": record.get("title") or title_for(record.get("messages", [])),
        "messages": openai_messages(record.get("messages", []), settings.pop("system_prompt", "") or "", image),
        "settings": settings,
    }
    return json.dumps(body, ensure_ascii=False, indent=2)


def clean_settings(settings, kinds: dict[str, tuple[type, ...]]) -> dict:
    """The settings whose name the page knows and whose value has a type it takes (``kinds``: name -> types);
    the rest are left out. Ranges are checked when a reply is asked for, with a message naming the field."""
    clean = {}
    for name, value in settings.items() if isinstance(settings, dict) else ():
        kind = kinds.get(name, ())
        if isinstance(value, kind) and not (isinstance(value, bool) and bool not in kind):
            clean[name] = value
    return clean


def _content(content, where: str, store_image, store_file, user: bool):
    """Imported content as the page shows it: a string, or (with images or documents) a list of file parts and
    the text."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else None
    if parts is None or not all(isinstance(p, dict) for p in parts):
        raise ValueError(f"{where}.content must be a string or a list of text, image_url and file parts")
    text, files = "", []
    for j, part in enumerate(parts):
        here = f"{where}.content[{j}]"
        if part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        elif part.get("type") == "image_url" and user and store_image is not None:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            files.append({"path": store_image(url, here)})
        elif part.get("type") == "file" and user and store_file is not None:
            files.append({"path": store_file(part.get("file"), here)})
        else:
            raise ValueError(f"{here} must be a text part{', an image_url or a file part' if user else ''}")
    return [*files, text] if files else text


def import_chat(
    data: bytes | str,
    kinds: dict[str, tuple[type, ...]],
    store_image: Callable[[str, str], str] | None = None,
    max_images: int | None = None,
    store_file: Callable[[object, str], str] | None = None,
    max_files: int | None = None,
) -> tuple[str, list[dict], dict]:
    """(title, the page's messages, settings) from an exported chat or a list of OpenAI messages.

    Raises ValueError saying what is wrong: not JSON, too large, no messages, a role or content it cannot
    show. Settings it does not know, or of a type it does not take, are left out (``clean_settings``); the
    system prompt becomes the setting of that name. A user message's ``image_url`` parts go through
    ``store_image(url, where)``, and its ``file`` parts (documents) through ``store_file(file, where)``, which
    give the path of a file holding it (ValueError if it is none); a chat with more than ``max_images`` images
    or ``max_files`` documents (None: no limit) is refused before any is stored."""
    if len(data) > MAX_IMPORT_BYTES:
        raise ValueError(f"the file is larger than {MAX_IMPORT_BYTES // 2**20} MiB")
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the file is not JSON ({e})") from e
    if isinstance(body, list):
        body = {"messages": body}
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise ValueError('expected an exported chat ({"messages": [...]}) or a list of OpenAI messages')
    settings = clean_settings(body.get("settings"), kinds)
    for kind, store, most, what in (
        ("image_url", store_image, max_images, "images"),
        ("file", store_file, max_files, "files"),
    ):
        sent = sum(
            isinstance(part, dict) and part.get("type") == kind
            for message in body["messages"]
            if isinstance(message, dict) and isinstance(message.get("content"), list)
            for part in message["content"]
        )
        if store is not None and most is not None and sent > most:
            raise ValueError(f"the chat holds {sent} {what}; at most {most} can be imported")
    messages, system = [], []
    for i, message in enumerate(body["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] needs a role of {', '.join(ROLES)}")
        user = message["role"] == "user"
        content = _content(message.get("content"), f"messages[{i}]", store_image, store_file, user)
        if message["role"] == "system":
            system.append(content)
        else:
            messages.append({"role": message["role"], "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("the chat has no user message")
    if system:
        settings["system_prompt"] = "\n\n".join(system)
    title = " ".join(str(body.get("title") or "").split())[:MAX_TITLE] or title_for(messages)
    return title, messages, settings


def page_secret(folder: Path) -> str:
    """The key the browser's saved chats are encrypted with, kept in ``folder`` so they survive a restart of
    the server (Gradio's default is a new key per start, which would make every saved chat unreadable). The page
    hands this key to the browser: it keeps other sites' scripts from reading the chats, not someone at the same
    browser profile."""
    path = folder / "page-secret"
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = ""
    if secret:
        return secret
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(secret)
    return secret


NOTE_KEYS = {
    "title": str,
    "status": str,
    "duration": (int, float),
    "log": str,
    "id": (str, int),
    "parent_id": (str, int),
}


def shown_messages(messages: list, page_file: Callable[[str], object], missing: Callable[[str], str]) -> list[dict]:
    """A saved chat's messages as the chat may show them. The browser keeps the saved chats, and may hold
    anything there: only text and file parts are kept, a file only where ``page_file(path)`` says the page
    stored it (else it becomes the text ``missing(path)``), and of a note's metadata only its plain fields."""
    shown = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            continue
        parts = message.get("content")
        parts = parts if isinstance(parts, (list, tuple)) else [parts]
        content = []
        for part in parts:
            if isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text"):
                content.append(text_of(part))
            else:
                for path in files_of(part):  # one at most: a part is one file
                    content.append({"path": path} if page_file(path) else missing(path))
        if len(content) <= 1 and all(isinstance(c, str) for c in content):
            content = content[0] if content else ""
        entry = {"role": message["role"], "content": content}
        metadata = message.get("metadata")
        if isinstance(metadata, dict):
            kept = {k: v for k, v in metadata.items() if k in NOTE_KEYS and isinstance(v, NOTE_KEYS[k])}
            if kept:
                entry["metadata"] = kept
        shown.append(entry)
    return shown
