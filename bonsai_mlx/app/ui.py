"""The Gradio page. All behaviour lives in bonsai_mlx.app.chat; this file only lays it out and wires events."""

from __future__ import annotations

import gradio as gr

from bonsai_mlx.app.chat import Conversation, Settings, regenerate, stop, submit
from bonsai_mlx.app.registry import Registry

NO_MODEL = """## No model found

Make one, then start the app again:

* **Train the built-in tiny model** (offline, a few minutes on a laptop):
  `python -m bonsai_mlx.train` → then `python -m bonsai_mlx.app --model runs/shapes/model`
* **Convert a Hugging Face Llava checkpoint** (SigLIP + Qwen2):
  `python -m bonsai_mlx.convert to-mlx llava-hf/llava-interleave-qwen-0.5b-hf models/pico-4bit --quantize 4`
  → then `python -m bonsai_mlx.app --models-dir models`
"""


def build(registry: Registry) -> gr.Blocks:
    with gr.Blocks(title="Pico chat", analytics_enabled=False) as demo:
        if not registry.models:
            gr.Markdown(NO_MODEL, elem_id="no-model")
            return demo
        names = list(registry.models)
        conv = gr.State(None)  # a Conversation per browser tab, made on first use
        gr.Markdown("# Pico · local chat over images")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chat", height=480, label="Conversation")
                stats = gr.Markdown(elem_id="stats")
                box = gr.MultimodalTextbox(
                    elem_id="input",
                    file_types=["image"],
                    file_count="single",
                    sources=["upload"],
                    placeholder="Drop, paste or pick an image, then ask about it…",
                    submit_btn=True,
                    stop_btn=True,
                    show_label=False,
                )
                with gr.Row():
                    regen_btn = gr.Button("Regenerate", elem_id="regenerate")
                    clear_btn = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1):
                model_dd = gr.Dropdown(names, value=names[0], label="Model", elem_id="model")
                gr.Markdown(f"<sub>Engine: {registry.engine_line()}</sub>", elem_id="engine")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens", elem_id="max-tokens")
                system = gr.Textbox("", label="System prompt", lines=3)

        settings_in = [temperature, top_p, max_tokens, system]

        def on_submit(c: Conversation | None, msg: dict, model_name, t, p, m, s):
            c = c or Conversation()
            files = (msg or {}).get("files") or []
            image = files[0] if files else None
            image = image.get("path") if isinstance(image, dict) else image
            for hist in submit(c, registry, model_name, (msg or {}).get("text", ""), image, Settings(t, p, m, s)):
                yield c, hist, "\n\n".join(c.stats[-1:]), gr.MultimodalTextbox(value=None, interactive=False)
            yield c, c.history, "\n\n".join(c.stats[-1:]), gr.MultimodalTextbox(value=None, interactive=True)

        def on_regenerate(c: Conversation | None, t, p, m, s):
            c = c or Conversation()
            for hist in regenerate(c, registry, Settings(t, p, m, s)):
                yield c, hist, "\n\n".join(c.stats[-1:])

        def on_clear(c: Conversation | None):
            c = c or Conversation()
            c.clear()
            return c, [], ""

        def on_stop(c: Conversation | None):
            if c is not None:
                stop(c)
            return gr.MultimodalTextbox(interactive=True)

        def on_model(c: Conversation | None, name):
            c = c or Conversation()
            c.clear()
            registry.get(name)  # load now (frees the previous model; waits for an answer in another tab)
            return c, [], f"Loaded **{name}**."

        box.submit(on_submit, [conv, box, model_dd, *settings_in], [conv, chatbot, stats, box])
        # Stop only raises the session's flag: the answer ends by itself, so the model keeps the partial answer
        # the user saw (cancelling the stream would drop it on the model side).
        box.stop(on_stop, [conv], [box])
        regen_btn.click(on_regenerate, [conv, *settings_in], [conv, chatbot, stats])
        # no `cancels`: a cancelled stream may never be closed, and would hold the model lock; Clear stops it instead
        clear_btn.click(on_clear, [conv], [conv, chatbot, stats])
        model_dd.change(on_model, [conv, model_dd], [conv, chatbot, stats])
    demo.queue(default_concurrency_limit=1)  # answers queue instead of interleaving on the shared model
    return demo
