"""A web page for the service: prompt, adapter, settings, optional melody in; the clip plays out.

`python -m serve.ui --endpoint http://127.0.0.1:33080 --port 33081` (Gradio, loopback by default).
The page only calls the HTTP API (`musiclora.client`), so it works against `serve run
serve/config.yaml`, `python -m serve.local` or any deployment; the API key comes from
`--api-key` or `$MUSICLORA_API_KEY` and stays on the page's server. The clip plays as the service
sent it, with the model family's channels (stereo for Stable Audio Open; `channels` in the
parameters shown).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

BASE_CHOICE = "(base model)"


def adapter_choices(client) -> list[str]:
    """`(base model)` then `name` and `name@version` for every registry adapter the service runs."""
    from musiclora.client import ServiceError

    try:
        listed = client.adapters()["adapters"]
    except ServiceError:
        return [BASE_CHOICE]
    out = [BASE_CHOICE]
    for entry in listed:
        if entry.get("models"):
            out.append(entry["name"])
            out.extend(f"{entry['name']}@{v}" for v in reversed(entry["versions"]))
    return out


def build_ui(endpoint: str, api_key: str | None = None, out_dir: str | None = None):
    """The Gradio page (a `gr.Blocks`) calling `endpoint`.

    Args:
        endpoint: base URL of the service.
        api_key: bearer key (default `$MUSICLORA_API_KEY`).
        out_dir: where generated clips are written for the page to play (default: a temp folder).
    """
    import gradio as gr

    from musiclora.client import ServiceClient, ServiceError

    client = ServiceClient(endpoint, api_key)
    out_dir = out_dir or tempfile.mkdtemp(prefix="musiclora-ui-")
    os.makedirs(out_dir, exist_ok=True)

    def generate(prompt: str, adapter: str, duration_s: float, guidance: float, seed: float, steps: float,
                 melody: str | None) -> tuple[str, dict[str, Any]]:
        try:
            clip = client.generate(
                prompt, adapter=None if adapter in (None, "", BASE_CHOICE) else adapter, duration_s=float(duration_s),
                guidance_scale=float(guidance), seed=int(seed), steps=int(steps) if steps else None, melody=melody,
            )
        except ServiceError as exc:
            raise gr.Error(f"{exc.status or 'no answer'}: {exc.reason}") from exc
        fd, path = tempfile.mkstemp(suffix=".wav", dir=out_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(clip.audio)
        return path, clip.params

    with gr.Blocks(title="musiclora") as page:
        gr.Markdown(f"## musiclora\nText to music with LoRA adapters, served at `{endpoint}`.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value="calm piano with soft strings", lines=2, elem_id="prompt")
                adapter = gr.Dropdown(adapter_choices(client), value=BASE_CHOICE, label="Adapter", elem_id="adapter",
                                      allow_custom_value=True)
                duration = gr.Slider(0.5, 30, value=2, step=0.5, label="Duration (s)", elem_id="duration")
                guidance = gr.Slider(1, 10, value=3, step=0.5, label="Guidance scale", elem_id="guidance")
                seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                steps = gr.Number(0, precision=0, label="Steps (diffusion families; 0 = default)", elem_id="steps")
                melody = gr.Audio(sources=["upload"], type="filepath", label="Melody / reference audio (optional)",
                                  elem_id="melody")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                audio = gr.Audio(type="filepath", label="Result", elem_id="result", interactive=False)
                params = gr.JSON(label="Generation parameters", elem_id="params")
        button.click(generate, [prompt, adapter, duration, guidance, seed, steps, melody], [audio, params])
    return page


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="The musiclora web page (Gradio) for a service endpoint.")
    p.add_argument("--endpoint", default="http://127.0.0.1:33080")
    p.add_argument("--api-key", default=None, help="bearer key (default: $MUSICLORA_API_KEY)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=33081)
    a = p.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    build_ui(a.endpoint, a.api_key).launch(server_name=a.host, server_port=a.port)


if __name__ == "__main__":
    main()
