"""The Gradio page of ``controlnet-emo app``: inputs on the left, what was drawn and what the
evaluation critic reads on it on the right, and a ``/generate`` endpoint for scripts.

Why a page over the commands: judging a ControlNet is looking at many faces beside their maps
and readings; the page keeps the pipeline and the critic loaded and draws a face per click,
through the same sampling path as ``infer`` (``engine.py`` holds every piece of model logic).
"""

from __future__ import annotations

import os
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # nothing leaves this machine

import gradio as gr  # noqa: E402

from controlnet_emo.app.engine import (  # noqa: E402
    STRENGTHS,
    AppError,
    Engine,
    circumplex,
    reading_json,
    upscale,
)
from controlnet_emo.labels import EXPRESSIONS  # noqa: E402
from controlnet_emo.models.sampling import SCHEDULERS  # noqa: E402

HOST, PORT = "127.0.0.1", 7860
SOURCES = ("held_out", "upload", "photo", "codes")
STRIP_STRENGTH, STRIP_EXPRESSION = "FLAME map strength", "expression in the prompt"
CSS = "#face img, #maps img, #target img, #strip img { image-rendering: pixelated; }"
API_DESCRIPTION = (
    "Draw a face from a FLAME render (any size or mode; resized as training did) with the "
    "run's validation settings and this seed. Returns the face (PNG, the model's resolution) "
    "and the evaluation critic's reading as JSON text: expression, probability, valence, "
    "arousal, probabilities."
)
CODES_HELP = (
    "Moves a face's FLAME expression towards a class and renders it, as `controlnet-emo edit` "
    "does. Needs files on this machine: a **FLAME model** (`generic_model.pkl` or a `.npz` "
    "with the same keys; `demo --codes` writes `runs/demo/raw/flame_model.npz`), an **EMOCA "
    "code folder** (`shape.npy`, `exp.npy`, `pose.npy`, optional `cam.npy`), the class means "
    "`expression_codes.npz` in the run's prepared data (prepare writes it from codes) and, "
    "for the skeleton map, FLAME's **landmark embedding** (optional)."
)


def image_upload(label: str, **kwargs: Any) -> gr.Image:
    """A ``gr.Image`` handing over the uploaded file untouched (16-bit depth maps stay 16-bit),
    whose unreadable upload is one message in the page instead of a server traceback.

    The check wraps this instance's ``preprocess``: a subclass would be a component the
    browser does not know (Gradio 6 draws nothing for it)."""
    image = gr.Image(type="filepath", image_mode=None, label=label, **kwargs)
    read = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return read(payload)
        except (OSError, ValueError, SyntaxError):
            name = getattr(payload, "orig_name", None) or "the file"
            raise gr.Error(f"{label}: {name} is not an image; upload a PNG or JPEG") from None

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def build(engine: Engine) -> gr.Blocks:
    """The page for one loaded engine (``gr.Blocks``; launch it, or mount it in FastAPI)."""
    held = engine.held_out
    first = engine.held_out_maps(0) if held else None
    d = engine.defaults
    with gr.Blocks(title="controlnet-emo", analytics_enabled=False) as page:
        source = gr.State("held_out")
        picked = gr.State(0 if held else None)
        gr.Markdown(
            f"## controlnet-emo: `{engine.model}`\n"
            f"Conditions {', '.join(engine.conditions)} ({engine.info.mode}), "
            f"{engine.size} px, base `{engine.info.base_model}`; faces read by the critic "
            f"`{engine.critic_spec}`."
        )
        for w in engine.warnings:
            gr.Markdown(f"**Warning:** {w}")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tabs():
                    with gr.Tab("Held-out") as tab_held:
                        gallery = gr.Gallery(
                            value=[(str(h.render), h.caption) for h in held],
                            label="held-out FLAME renders: click one",
                            columns=6,
                            height=300,
                            allow_preview=False,
                            selected_index=0 if held else None,
                            elem_id="gallery",
                        )
                    with gr.Tab("Upload") as tab_upload:
                        up_flame = _upload("FLAME render")
                        with gr.Row():
                            up_depth = _upload("depth map (optional)")
                            up_skeleton = _upload("skeleton map (optional)")
                    with gr.Tab("Photo") as tab_photo:
                        gr.Markdown(
                            "Depth and skeleton are derived from the photo as "
                            "`infer --reference` derives them (the run's depth model and "
                            "face-alignment's landmarks; their weights must be on this machine)."
                        )
                        photo = _upload("photo of a face")
                        photo_flame = _upload("FLAME render (optional)")
                    with gr.Tab("Codes") as tab_codes:
                        gr.Markdown(CODES_HELP)
                        flame_model = gr.Textbox(label="FLAME model file (.pkl / .npz)")
                        codes = gr.Textbox(label="EMOCA code folder")
                        embedding = gr.Textbox(label="landmark embedding (optional)")
                        with gr.Row():
                            expression = gr.Dropdown(
                                list(EXPRESSIONS), value="happy", label="move towards"
                            )
                            strength = gr.Slider(0, 1, 0.8, step=0.05, label="strength")
                prompt = gr.Textbox(
                    value=held[0].prompt if held else "a photo of a happy face", label="prompt"
                )
                with gr.Row():
                    seed = gr.Number(d.seed, precision=0, label="seed")
                    steps = gr.Slider(1, 100, d.steps, step=1, label="steps")
                with gr.Row():
                    guidance = gr.Slider(1, 15, d.guidance_scale, step=0.5, label="guidance")
                    map_guidance = gr.Checkbox(d.map_guidance, label="guidance over the maps")
                with gr.Accordion("per-condition strength, sampler", open=False):
                    scales = {
                        c: gr.Slider(0, 2, 1.0, step=0.05, label=f"{c} strength")
                        for c in engine.conditions
                    }
                    scheduler = gr.Dropdown(list(SCHEDULERS), value=d.scheduler, label="sampler")
                    negative = gr.Textbox(d.negative_prompt, label="negative prompt")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Row():
                    strip_kind = gr.Radio(
                        [STRIP_STRENGTH, STRIP_EXPRESSION], value=STRIP_STRENGTH, label="strip over"
                    )
                    strip = gr.Button("Draw strip", elem_id="draw-strip")
            with gr.Column(scale=2):
                gr.Markdown("**Maps used** (each labelled)")
                maps_out = gr.Image(
                    engine.maps_picture(first[0]) if first else None,
                    label="maps used",
                    show_label=False,
                    format="png",
                    elem_id="maps",
                )
                with gr.Row():
                    face_out = gr.Image(label="generated face", format="png", elem_id="face")
                    face_label = gr.Label(num_top_classes=4, label="critic on the face")
                    va_out = gr.Image(circumplex([]), label="valence / arousal", format="png")
                with gr.Row():
                    target_out = gr.Image(
                        upscale(first[1]) if first else None,
                        label="target (held-out photo)",
                        format="png",
                        elem_id="target",
                    )
                    target_label = gr.Label(num_top_classes=4, label="critic on the target")
                    target_text = gr.Markdown(_annotation(engine, 0) if held else "")
                reading_out = gr.Code(language="json", label="reading (as /generate returns it)")
                gr.Markdown(
                    "**Strip**: one seed, each tile labelled with what changed and the critic's reading"
                )
                strip_out = gr.Image(label="strip", show_label=False, format="png", elem_id="strip")

        # The API endpoint: its own small inputs, so scripts need no knowledge of the tabs.
        with gr.Row(visible=False):
            api_render = image_upload("render")
            api_prompt = gr.Textbox(label="prompt")
            api_seed = gr.Number(0, precision=0, label="seed")
            api_face = gr.Image(format="png", label="face")
            api_reading = gr.Textbox(label="reading")
            api_button = gr.Button()

        inputs = {
            source, picked, up_flame, up_depth, up_skeleton, photo, photo_flame, flame_model,
            codes, embedding, expression, strength, prompt, seed, steps, guidance,
            map_guidance, scheduler, negative, *scales.values(),
        }  # fmt: skip

        def maps_of(v: dict) -> tuple[Any, Any, int | None]:
            """The chosen input's maps, and the held-out target where the input is one."""
            where = v[source]
            if where == "held_out":
                if v[picked] is None:
                    raise AppError("pick a held-out sample in the gallery first")
                maps, target = engine.held_out_maps(v[picked])
                return maps, target, v[picked]
            if where == "upload":
                return engine.upload_maps(v[up_flame], v[up_depth], v[up_skeleton]), None, None
            if where == "photo":
                return engine.photo_maps(v[photo], v[photo_flame]), None, None
            maps = engine.codes_maps(
                v[flame_model], v[codes], v[expression], v[strength], v[embedding] or None
            )
            return maps, None, None

        def sampling_of(v: dict) -> Any:
            if v[seed] is None:
                raise AppError("seed: enter a whole number")
            return engine.sampling(
                seed=int(v[seed]),
                steps=int(v[steps]),
                guidance_scale=float(v[guidance]),
                map_guidance=bool(v[map_guidance]),
                scheduler=v[scheduler],
                negative_prompt=v[negative] or "",
                scales={c: float(v[s]) for c, s in scales.items()},
            )

        def on_generate(v: dict, progress: Any = gr.Progress()) -> tuple:  # noqa: B008 (Gradio injects it)
            try:
                progress(0.05, desc="reading the maps")
                maps, target, index = maps_of(v)
                s = sampling_of(v)
                progress(0.15, desc=f"drawing the face ({s.steps} steps)")
                face = engine.draw(maps, v[prompt], s)
                progress(0.9, desc="reading the face")
                reads = engine.read([face] if target is None else [face, target])
            except AppError as err:
                raise gr.Error(str(err)) from None
            mine = reads[0]
            points = [("generated", mine.valence, mine.arousal, "tab:red")]
            if target is not None:
                points.append(("target (critic)", reads[1].valence, reads[1].arousal, "tab:blue"))
                lab = engine.held_out[index].labels
                points.append(("target (label)", lab.valence, lab.arousal, "tab:green"))
            text = reading_json(
                mine, indent=2, seed=s.seed, prompt=v[prompt], critic=engine.critic_spec
            )
            return (
                engine.maps_picture(maps),
                upscale(face),
                mine.probabilities,
                circumplex(points),
                upscale(target) if target is not None else None,
                reads[1].probabilities if target is not None else None,
                _annotation(engine, index) if index is not None else "",
                text,
            )

        run.click(
            on_generate,
            inputs,
            [maps_out, face_out, face_label, va_out, target_out, target_label, target_text,
             reading_out],
            api_visibility="private",
        )  # fmt: skip

        def on_strip(v: dict, progress: Any = gr.Progress()) -> Any:  # noqa: B008 (Gradio injects it)
            try:
                maps, _, _ = maps_of(v)
                s = sampling_of(v)

                def tell(f: float, what: str) -> None:
                    progress(f, desc=what)

                if v[strip_kind] == STRIP_EXPRESSION:
                    sheet, _ = engine.expression_strip(maps, s, tell)
                else:
                    sheet, _ = engine.strength_strip(maps, v[prompt], s, STRENGTHS, tell)
            except AppError as err:
                raise gr.Error(str(err)) from None
            return sheet

        strip.click(on_strip, inputs | {strip_kind}, strip_out, api_visibility="private")

        def on_pick(evt: gr.SelectData) -> tuple:
            try:
                maps, target = engine.held_out_maps(evt.index)
            except AppError as err:
                raise gr.Error(str(err)) from None
            found = engine.demo_codes(evt.index)
            return (
                evt.index,
                "held_out",
                engine.maps_picture(maps),
                upscale(target),
                engine.held_out[evt.index].prompt,
                _annotation(engine, evt.index),
                found[0] if found else gr.skip(),
                found[1] if found else gr.skip(),
            )

        gallery.select(
            on_pick,
            None,
            [picked, source, maps_out, target_out, prompt, target_text, flame_model, codes],
            api_visibility="private",
        )
        for tab, name in zip((tab_held, tab_upload, tab_photo, tab_codes), SOURCES, strict=True):
            tab.select(lambda n=name: n, None, source, api_visibility="private")

        def generate(render: str | None, prompt: str, seed: int) -> tuple:
            """A face from a FLAME render, a prompt and a seed; the critic's reading as JSON."""
            try:
                if render is None:
                    raise AppError("render: upload a FLAME render")
                maps = engine.upload_maps(render)
                s = engine.sampling(seed=int(seed or 0))
                face = engine.draw(maps, prompt or "", s)
                reading = engine.read([face])[0]
            except AppError as err:
                raise gr.Error(str(err)) from None
            return face, reading_json(
                reading, seed=s.seed, prompt=prompt, critic=engine.critic_spec
            )

        api_button.click(
            generate,
            [api_render, api_prompt, api_seed],
            [api_face, api_reading],
            api_name="generate",
            api_description=API_DESCRIPTION,
        )
    return page


def launch(
    model: str | None = None,
    host: str = HOST,
    port: int = PORT,
    critic: str | None = None,
    device: str | None = None,
    data: str | None = None,
    prevent_thread_lock: bool = False,
) -> gr.Blocks:
    """Load the run and its critic once, and serve the page on ``host:port`` (localhost by
    default; never shared). Returns the running ``gr.Blocks`` (``.close()`` stops it)."""
    engine = Engine(model, critic=critic, device=device, data=data)
    page = build(engine)
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=prevent_thread_lock,
        theme=gr.themes.Default(
            font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web font download
            font_mono=["ui-monospace", "monospace"],
        ),
        css=CSS,
        footer_links=["api"],
        quiet=prevent_thread_lock,
    )
    return page


def _upload(label: str) -> gr.Image:
    return image_upload(label, sources=["upload", "clipboard"])


def _annotation(engine: Engine, index: int) -> str:
    lab = engine.held_out[index].labels
    return (
        f"**Target #{index}** annotated {lab.expression or 'unknown'}, "
        f"valence {lab.valence:+.2f}, arousal {lab.arousal:+.2f}"
    )
