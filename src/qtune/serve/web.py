"""The Gradio chat app (UI only): streaming chat, system prompt, generation settings, new conversation and
transcript download. Each browser session keeps its own history in ``gr.State``; the conversation logic is
:class:`qtune.serve.session.ChatSession`.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import gradio as gr

from qtune.data.templates import ALPACA_PREAMBLE
from qtune.serve.engine import Engine, GenerationSettings
from qtune.serve.session import ChatSession, Turn

CODING_SYSTEM_PROMPT = "You are a careful coding assistant. Answer with correct, concise code and a short explanation."
"""Default system prompt for ``chat``-template runs (``alpaca`` runs default to the preamble they were trained with)."""
CSS = """#chat [data-testid="bot"], #chat [data-testid="user"] { white-space: pre-wrap; }
#chat [data-testid="bot"] { font-family: ui-monospace, monospace; font-size: 0.9em; }"""
"""Page style (pass to ``gr.mount_gradio_app``): messages keep their line breaks and indentation; answers in monospace."""


def default_system_prompt(engine: Engine) -> str:
    """The system prompt the UI starts with: the training preamble for ``alpaca``, a coding assistant for ``chat``."""
    return ALPACA_PREAMBLE if engine.template == "alpaca" else CODING_SYSTEM_PROMPT


def _assistant(text: str) -> dict:
    # a text part, not a bare string: Gradio dedents bare strings (inspect.cleandoc), which breaks code indentation
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _write_transcript(session: ChatSession) -> str:
    folder = Path(tempfile.gettempdir()) / "qtune-transcripts"
    folder.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="chat-", dir=folder, delete=False,
                                     encoding="utf-8") as f:
        f.write(session.transcript())
    return f.name


def build_ui(engine: Engine, defaults: GenerationSettings | None = None) -> gr.Blocks:
    """The chat page for ``engine``; mount it with ``gr.mount_gradio_app`` (see :func:`qtune.serve.api.create_app`).

    Args:
        defaults: initial slider values (greedy, 256 new tokens when None).
    """
    d = defaults or GenerationSettings()
    max_new_cap = max(1, min(4096, engine.context_length - 1))

    def respond(message, turns, chat, system, temperature, top_p, max_new_tokens, repetition_penalty):
        if not message or not message.strip():
            gr.Info("Empty message ignored: type a question, then press Enter.")
            yield message, turns, chat, gr.skip(), gr.skip()
            return
        try:
            settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                          top_p=float(top_p), repetition_penalty=float(repetition_penalty))
            session = ChatSession(engine, system.strip() or None, [Turn(**t) for t in turns])
            reply = session.ask(message, settings)
        except ValueError as e:  # out-of-range settings, a message longer than the context
            gr.Warning(str(e))
            yield message, turns, chat, gr.skip(), gr.skip()
            return
        if reply.notice:
            gr.Info(reply.notice)
        chat = list(chat) + [{"role": "user", "content": message}, _assistant("")]
        text = ""
        for piece in reply:
            text += piece
            chat[-1] = _assistant(text)
            yield "", turns, chat, gr.skip(), gr.Button(interactive=False)  # Send is off while answering
        chat[-1] = _assistant(session.turns[-1].assistant)
        transcript = gr.DownloadButton(value=_write_transcript(session), interactive=True)
        yield "", [asdict(t) for t in session.turns], chat, transcript, gr.Button(interactive=True)

    def new_conversation():
        return "", [], [], gr.DownloadButton(value=None, interactive=False), gr.Button(interactive=True)

    with gr.Blocks(title=f"qtune · {engine.name}") as demo:
        gr.Markdown(f"### qtune chat · `{engine.name}`  \ntemplate `{engine.template}`, context "
                    f"{engine.context_length} tokens; oldest turns leave the prompt first when it is full.")
        turns = gr.State([])
        # answers are mostly bare code: shown as plain text with its line breaks and indentation kept
        chat = gr.Chatbot(label="Conversation", height=720, elem_id="chat", render_markdown=False)
        with gr.Row():
            message = gr.Textbox(placeholder="Ask a coding question and press Enter", show_label=False, scale=5,
                                 elem_id="message", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            clear = gr.Button("New conversation", elem_id="new")
            download = gr.DownloadButton("Download transcript", interactive=False, elem_id="download")
        with gr.Accordion("System prompt and generation settings", open=False):
            system = gr.Textbox(value=default_system_prompt(engine), label="System prompt", lines=2)
            temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p")
            max_new = gr.Slider(1, max_new_cap, value=min(d.max_new_tokens, max_new_cap), step=1,
                                label="Max new tokens")
            rep = gr.Slider(1.0, 2.0, value=d.repetition_penalty, step=0.05, label="Repetition penalty")
        inputs = [message, turns, chat, system, temperature, top_p, max_new, rep]
        outputs = [message, turns, chat, download, send]
        message.submit(respond, inputs, outputs)
        send.click(respond, inputs, outputs)
        clear.click(new_conversation, None, outputs, queue=False)
        chat.clear(new_conversation, None, outputs, queue=False)  # the chat box's own trash button
    return demo
