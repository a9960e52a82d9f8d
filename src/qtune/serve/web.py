"""The Gradio chat app (UI only): streaming chat with a Stop button, system prompt, generation settings, new
conversation and transcript download. Each browser session keeps its own history in ``gr.State``; the
conversation logic is :class:`qtune.serve.session.ChatSession`.

Messages are shown as Markdown (:func:`display`): fenced code blocks are highlighted (Prism) with their text and
indentation exactly as generated, also while a block is still streaming (an unclosed fence runs to the end);
text without a fence that Markdown would change (indentation, ``*``, ``#``, ``_`` ...: mostly bare code, as
CodeAlpaca-style adapters answer) is shown exactly as written, in one plain code block. The code blocks' copy
button copies the code exactly (:data:`JS`; Gradio's own trims the first line's indentation).

Stop ends the answer being streamed at its next token (the turn keeps the text so far); closing or reloading the
tab does the same. A session's transcript is one file in its own folder (``qtune-chat-*`` in Gradio's cache
folder, so Gradio serves it without copying it), replaced at each turn and deleted with the session.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from qtune.data.templates import ALPACA_PREAMBLE
from qtune.serve.engine import Engine, GenerationSettings
from qtune.serve.session import ChatSession, Reply, Turn

CODING_SYSTEM_PROMPT = "You are a careful coding assistant. Answer with correct, concise code and a short explanation."
"""Default system prompt for ``chat``-template runs (``alpaca`` runs default to the preamble they were trained with)."""
CSS = """#chat pre code { white-space: pre; overflow-x: auto; tab-size: 4; }"""
"""Page style (pass to ``gr.mount_gradio_app``): code lines never wrap, so indentation shows as generated."""
JS = """() => {
  // Gradio's copy button copies the block's innerText trimmed, which loses the first line's indentation:
  // this listener runs first (capture phase) and copies the code's text exactly instead
  document.addEventListener("click", (event) => {
    const button = event.target instanceof Element ? event.target.closest("#chat .copy_code_button") : null;
    const code = button ? button.parentElement.querySelector("pre code") : null;
    if (!code) return;
    event.stopImmediatePropagation();
    const text = code.textContent;
    const copied = () => {
      const check = button.children[1];
      if (check) { check.style.opacity = "1"; setTimeout(() => { check.style.opacity = "0"; }, 2000); }
    };
    if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(text).then(copied); return; }
    const area = document.createElement("textarea");
    area.value = text;
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    if (document.execCommand("copy")) copied();
    area.remove();
  }, true);
}"""
"""Page script (pass to ``gr.mount_gradio_app``): the code blocks' copy button copies the code exactly."""

_FENCE = re.compile(r"^ {0,3}(```|~~~)", re.MULTILINE)
_MARKDOWN_SIGNS = re.compile(r"[\\`*_\[\]<>#|~&]|^[ \t]|^[-+=]|^\d+[.)]| {2}", re.MULTILINE)
"""Anything Markdown could render otherwise than as the same text: escapes, emphasis, code, links, HTML, headings,
tables, entities, indentation, list or rule markers, and runs of spaces (collapsed by HTML)."""


def default_system_prompt(engine: Engine) -> str:
    """The system prompt the UI starts with: the training preamble for ``alpaca``, a coding assistant for ``chat``."""
    return ALPACA_PREAMBLE if engine.template == "alpaca" else CODING_SYSTEM_PROMPT


def display(text: str) -> str:
    """The Markdown shown for a message: the text itself when it has a code fence (```` ``` ```` or ``~~~``) or
    nothing that Markdown would change; otherwise the text in one plain fenced code block, so that it shows
    exactly as written (bare code keeps its indentation, ``*`` and ``#`` stay characters)."""
    if _FENCE.search(text) or not _MARKDOWN_SIGNS.search(text):
        return text
    return f"```\n{text}\n```"  # no line of the text starts a fence, so none closes this one


def _message(role: str, text: str) -> dict:
    # a text part, not a bare string: Gradio dedents bare strings (inspect.cleandoc), which breaks code indentation
    return {"role": role, "content": [{"type": "text", "text": display(text)}]}


def _assistant(text: str) -> dict:
    return _message("assistant", text)


SessionKey = str | None
"""Gradio's session hash of a request (``gr.Request.session_hash``; None for a request outside a session)."""


class _Sessions:
    """What each browser session holds on the server, by Gradio session hash: the answer being streamed (so that
    Stop can end it) and the folder with its transcript (deleted when the session ends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: dict[SessionKey, Reply] = {}
        self._folders: dict[SessionKey, Path] = {}

    def started(self, key: SessionKey, reply: Reply) -> None:
        with self._lock:
            self._replies[key] = reply

    def finished(self, key: SessionKey, reply: Reply) -> bool:
        """The answer has ended; False when its session ended first (then nothing more is kept for it)."""
        with self._lock:
            if self._replies.get(key) is reply:
                del self._replies[key]
                return True
            return False

    def stop(self, key: SessionKey) -> None:
        """End the session's answer at its next token (nothing when none is streaming)."""
        with self._lock:
            reply = self._replies.get(key)
        if reply is not None:
            reply.stop()

    def write_transcript(self, key: SessionKey, session: ChatSession) -> str:
        """Write the transcript as the session's only file; returns its path."""
        with self._lock:
            folder = self._folders.get(key)
            if folder is None:
                Path(get_upload_folder()).mkdir(parents=True, exist_ok=True)
                folder = self._folders[key] = Path(tempfile.mkdtemp(prefix="qtune-chat-", dir=get_upload_folder()))
        for old in folder.iterdir():
            old.unlink()
        with tempfile.NamedTemporaryFile(
            "w", suffix=".json", prefix="chat-", dir=folder, delete=False, encoding="utf-8"
        ) as f:
            f.write(session.transcript())
        return f.name

    def end(self, key: SessionKey) -> None:
        """The session is over (tab closed): stop its answer and delete its transcript folder."""
        with self._lock:
            reply = self._replies.pop(key, None)
            folder = self._folders.pop(key, None)
        if reply is not None:
            reply.stop()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def build_ui(engine: Engine, defaults: GenerationSettings | None = None) -> gr.Blocks:
    """The chat page for ``engine``; mount it with ``gr.mount_gradio_app`` (see :func:`qtune.serve.api.create_app`).

    Args:
        defaults: initial slider values (greedy, 256 new tokens when None).
    """
    sessions = _Sessions()
    respond = _responder(engine, sessions)

    def stop(request: gr.Request):
        sessions.stop(request.session_hash)

    def end_session(request: gr.Request):
        sessions.end(request.session_hash)

    with gr.Blocks(title=f"qtune · {engine.name}") as demo:
        page = _Page.build(engine, defaults or GenerationSettings())
        inputs = [
            page.message,
            page.turns,
            page.chat,
            page.system,
            page.temperature,
            page.top_p,
            page.max_new,
            page.rep,
        ]
        outputs = [page.message, page.turns, page.chat, page.download, page.send, page.stop]
        page.message.submit(respond, inputs, outputs)
        page.send.click(respond, inputs, outputs)
        # not queued: runs at once, also while this session's answer holds the queue's only slot
        page.stop.click(stop, None, None, queue=False)
        page.clear.click(_new_conversation, None, outputs, queue=False)
        page.chat.clear(_new_conversation, None, outputs, queue=False)  # the chat box's own trash button
        demo.unload(end_session)
    return demo


@dataclass
class _Page:
    """The components of the chat page (built inside a ``gr.Blocks`` context, in page order)."""

    turns: gr.State
    chat: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    clear: gr.Button
    download: gr.DownloadButton
    system: gr.Textbox
    temperature: gr.Slider
    top_p: gr.Slider
    max_new: gr.Slider
    rep: gr.Slider

    @classmethod
    def build(cls, engine: Engine, d: GenerationSettings) -> _Page:
        """Lay out the page: header, conversation, message row, buttons, and the settings (sliders at ``d``)."""
        max_new_cap = max(1, min(4096, engine.context_length - 1))
        gr.Markdown(
            f"### qtune chat · `{engine.name}`  \ntemplate `{engine.template}`, context "
            f"{engine.context_length} tokens; oldest turns leave the prompt first when it is full."
        )
        turns = gr.State([])
        # Markdown with highlighted code (see display()); no LaTeX, so that "$$" in code and prose stays text
        chat = gr.Chatbot(label="Conversation", height=720, elem_id="chat", render_markdown=True, latex_delimiters=[])
        with gr.Row():
            message = gr.Textbox(
                placeholder="Ask a coding question and press Enter",
                show_label=False,
                scale=5,
                elem_id="message",
                autofocus=True,
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop_button = gr.Button("Stop", variant="stop", scale=1, elem_id="stop", interactive=False)
        with gr.Row():
            clear = gr.Button("New conversation", elem_id="new")
            download = gr.DownloadButton("Download transcript", interactive=False, elem_id="download")
        with gr.Accordion("System prompt and generation settings", open=False):
            system = gr.Textbox(value=default_system_prompt(engine), label="System prompt", lines=2)
            temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p")
            max_new = gr.Slider(
                1, max_new_cap, value=min(d.max_new_tokens, max_new_cap), step=1, label="Max new tokens"
            )
            rep = gr.Slider(1.0, 2.0, value=d.repetition_penalty, step=0.05, label="Repetition penalty")
        return cls(turns, chat, message, send, stop_button, clear, download, system, temperature, top_p, max_new, rep)


def _new_conversation():
    """Outputs that start a new conversation: empty message, turns and chat, no transcript, Send on, Stop off."""
    return (
        "",
        [],
        [],
        gr.DownloadButton(value=None, interactive=False),
        gr.Button(interactive=True),
        gr.Button(interactive=False),
    )


def _responder(engine: Engine, sessions: _Sessions):
    """The Send handler: streams the answer to a message into the chat (outputs: message box, turns, chat,
    transcript button, Send, Stop), and writes the session's transcript once the answer has ended."""

    def respond(
        message, turns, chat, system, temperature, top_p, max_new_tokens, repetition_penalty, request: gr.Request
    ):
        if not message or not message.strip():
            gr.Info("Empty message ignored: type a question, then press Enter.")
            yield message, turns, chat, gr.skip(), gr.skip(), gr.skip()
            return
        try:
            settings = GenerationSettings(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                repetition_penalty=float(repetition_penalty),
            )
            session = ChatSession(engine, system if system.strip() else None, [Turn(**t) for t in turns])
            reply = session.ask(message, settings)
        except ValueError as e:  # out-of-range settings, a message longer than the context
            gr.Warning(str(e))
            yield message, turns, chat, gr.skip(), gr.skip(), gr.skip()
            return
        if reply.notice:
            gr.Info(reply.notice)
        chat = list(chat) + [_message("user", message), _assistant("")]
        answering = gr.Button(interactive=False), gr.Button(interactive=True)  # Send off, Stop on
        sessions.started(request.session_hash, reply)
        try:
            yield "", turns, chat, gr.skip(), *answering
            text = ""
            for piece in reply:
                text += piece
                chat[-1] = _assistant(text)
                yield "", turns, chat, gr.skip(), *answering
        finally:
            alive = sessions.finished(request.session_hash, reply)
        if not alive:  # the tab was closed while answering: no transcript for a session that has ended
            return
        chat[-1] = _assistant(session.turns[-1].assistant)
        transcript = gr.DownloadButton(value=sessions.write_transcript(request.session_hash, session), interactive=True)
        yield (
            "",
            [asdict(t) for t in session.turns],
            chat,
            transcript,
            gr.Button(interactive=True),
            gr.Button(interactive=False),
        )

    return respond
