"""The run folder's ``README.md``: what the model is, how it was trained, and how to load it.

Why generated: a run folder is what gets shared (the hub, a colleague's disk), and the card
is the one place that says which maps go in which channels. Written from the resolved config,
so it never disagrees with the weights beside it. The card is a ``huggingface_hub``
``ModelCard`` whose YAML header is a ``ModelCardData`` (``library_name``, ``base_model``,
``license``, ``pipeline_tag``, ``tags``), so the hub, ``ModelCard.load`` and other tools read
the metadata the way they read any diffusers model's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import ModelCard, ModelCardData

from controlnet_emo.atomic import atomic_write_text
from controlnet_emo.config import Config

OWN_BASES = ("tiny", "demo-face-base")
"""Bases whose weights this project makes (Apache-2.0, like the code); any other base's
licence carries over to a ControlNet trained on it, and the card cannot know it."""
TAGS = ("controlnet", "stable-diffusion", "stable-diffusion-diffusers", "controlnet-emo")

CONDITION_HELP = {
    "flame": "FLAME render (EMOCA geometry, RGB, on the photo's canvas)",
    "depth": "depth map, near = bright, grey replicated to RGB",
    "skeleton": "68-landmark skeleton drawing (RGB lines on black)",
}


def write_model_card(run_dir: str | Path, cfg: Config, steps: int) -> Path:
    """Write ``RUN/README.md`` (atomically) and return its path."""
    run = Path(run_dir)
    path = run / "README.md"
    atomic_write_text(path, str(build_model_card(run, cfg, steps)))
    return path


def render_model_card(run: Path, cfg: Config, steps: int) -> str:
    """The card's text (YAML header, then markdown), as `write_model_card` writes it."""
    return str(build_model_card(run, cfg, steps))


def build_model_card(run: Path, cfg: Config, steps: int) -> ModelCard:
    """The run's card as a ``huggingface_hub.ModelCard``: ``card.data`` is the metadata the
    hub indexes, ``card.push_to_hub(repo)`` shares it beside the weights."""
    multi = cfg.model.controlnet.mode == "multi"
    body = [
        f"# {run.name}: emotion-faithful face ControlNet\n",
        f"A ControlNet for `{cfg.model.pretrained}` that draws faces following "
        f"{_join(cfg.conditions)} maps and the emotion they carry. Trained with controlnet-emo "
        f"for {steps} steps at {cfg.data.resolution}x{cfg.data.resolution} px on an "
        f"{'SDXL' if run_family(run) == 'sdxl' else 'SD 1.x/2.x'} base"
        + (
            f" (`{cfg.model.pretrained}` is a random test model: this run checks the plumbing, "
            "not the faces)."
            if cfg.model.pretrained in ("tiny", "tiny-xl")
            else "."
        )
        + "\n",
        _conditions_section(cfg, multi),
        _recipe_section(cfg, steps, run),
        _samples_section(run),
        _files_section(run, cfg, multi),
        _usage_section(run, cfg, multi),
        _license_section(cfg),
    ]
    text = "\n".join(body).rstrip() + "\n"
    return ModelCard(f"---\n{card_data(cfg).to_yaml()}\n---\n\n{text}")


def card_data(cfg: Config) -> ModelCardData:
    """The card's YAML header. ``base_model`` only for a hub id: a local path means nothing
    on another machine. ``inference: false``: the hub's widget cannot feed condition maps."""
    base = cfg.model.pretrained
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists()
    return ModelCardData(
        library_name="diffusers",
        base_model=base if hub_id else None,
        license="apache-2.0" if base in OWN_BASES else "other",
        pipeline_tag="text-to-image",
        tags=[*TAGS, "face", "emotion", *cfg.conditions],
        inference=False,
    )


def _license_section(cfg: Config) -> str:
    if cfg.model.pretrained in OWN_BASES:
        return "## License\n\nApache-2.0, like the base model and controlnet-emo itself.\n"
    return (
        f"## License\n\nThese weights were trained on `{cfg.model.pretrained}`: its licence "
        "(and your training data's terms) apply to them. The header says `license: other` "
        "until you set it.\n"
    )


def _conditions_section(cfg: Config, multi: bool) -> str:
    rows = ["## Conditions", ""]
    if multi:
        rows.append(
            "Mode `multi`: one 3-channel ControlNet per condition (diffusers "
            "`MultiControlNetModel`), each driven by an ordinary RGB hint.\n"
        )
        rows += ["| net | condition | map |", "| --- | --- | --- |"]
        rows += [
            f"| `controlnet{'' if i == 0 else f'_{i}'}` | {c} | {CONDITION_HELP[c]} |"
            for i, c in enumerate(cfg.conditions)
        ]
    else:
        n = 3 * len(cfg.conditions)
        rows.append(
            f"Mode `stacked`: one ControlNet with {n} hint channels, the maps "
            "concatenated in this order (the order is also in the file's metadata).\n"
        )
        rows += ["| channels | condition | map |", "| --- | --- | --- |"]
        rows += [
            f"| {3 * i}-{3 * i + 2} | {c} | {CONDITION_HELP[c]} |"
            for i, c in enumerate(cfg.conditions)
        ]
    rows.append(
        f"\nEvery map is RGB in [0, 1] at {cfg.data.resolution} px (shortest side resized, centre "
        f"crop). Training dropped each map with probability {cfg.data.condition_dropout}, so any "
        "subset works: a missing map is all zeros.\n"
    )
    return "\n".join(rows)


def _recipe_section(cfg: Config, steps: int, run: Path) -> str:
    loss, train = cfg.loss, cfg.train
    weights = {k: v for k, v in loss.weights().items() if v > 0}
    gamma = loss.diffusion.snr_gamma
    rows = [
        "## Training recipe",
        "",
        "| term | weight |",
        "| --- | --- |",
        *(f"| {k} | {v:g} |" for k, v in weights.items()),
        "",
        f"- diffusion loss: {loss.diffusion.kind}"
        + (f", min-SNR gamma {gamma:g}" if gamma is not None else ", no SNR weighting"),
        f"- pixel terms decoded with: {cfg.model.decoder}; LPIPS net: {cfg.model.lpips_net}; "
        f"emotion targets: {loss.emotion.target}",
        f"- learning rate {train.learning_rate:g} ({train.lr_scheduler}), total batch "
        f"{train.total_batch_size} ({train.batch_size} per device), {steps} steps, "
        f"mixed precision {train.mixed_precision}",
        f"- UNet: {cfg.model.unet_trainable}"
        + (f" (LoRA rank {cfg.model.lora_rank})" if cfg.model.unet_trainable == "lora" else ""),
    ]
    last = _last_metrics(run)
    if last:
        rows.append(f"- last logged loss: {last['loss']:.4f} (step {last.get('step', '?')})")
    return "\n".join(rows) + "\n"


def _samples_section(run: Path) -> str:
    samples = sorted(run.glob("samples/step-*.png"), key=_step_of)
    if not samples:
        return (
            "## Samples\n\nNo validation grid yet (`samples/step-N.png` appear during training).\n"
        )
    latest = samples[-1].relative_to(run).as_posix()
    return (
        f"## Samples\n\nLatest validation grid (rows: conditions | generated | target):\n\n"
        f"![validation samples at step {_step_of(samples[-1])}]({latest})\n"
    )


def _files_section(run: Path, cfg: Config, multi: bool) -> str:
    rows = [
        "## Files",
        "",
        "- `controlnet/`: diffusers `ControlNetModel` folder"
        + (", with `controlnet_1/`, ... one per condition" if multi else "")
        + " (and `controlnet_emo.json`: condition order, base model, resolution)",
    ]
    if multi:
        rows.append(
            "- `controlnet_<condition>.safetensors`: one original-layout file per "
            "condition (ComfyUI / A1111)"
        )
    else:
        rows.append(
            "- `controlnet.safetensors`: original ControlNet layout (`control_model.` "
            "keys); its metadata holds the condition order, base model and recipe"
        )
    if cfg.model.unet_trainable == "lora":
        rows.append("- `unet_lora/`: the UNet LoRA trained alongside (load it too)")
    elif cfg.model.unet_trainable != "none":
        rows.append(
            f"- `unet/`: the UNet with its {cfg.model.unet_trainable} tuned (use it "
            "instead of the base UNet)"
        )
    rows += ["- `config.yaml`: the resolved training config; `metrics.jsonl`, `logs/`: curves", ""]
    return "\n".join(rows)


def run_family(run: Path) -> str:
    """'sdxl' or 'sd': the family the run's saved ControlNet records (its sidecar, else its
    config); 'sd' before a net is saved."""
    for name in ("controlnet_emo.json", "config.json"):
        path = run / "controlnet" / name
        if path.is_file():
            data = json.loads(path.read_text())
            if "family" in data:
                return str(data["family"])
            if "addition_embed_type" in data:
                return "sdxl" if data["addition_embed_type"] == "text_time" else "sd"
    return "sd"


def _usage_section(run: Path, cfg: Config, multi: bool) -> str:
    base = (
        cfg.model.pretrained if cfg.model.pretrained not in ("tiny", "tiny-xl") else "path/to/base"
    )
    xl = run_family(run) == "sdxl"
    pipeline = "StableDiffusionXLControlNetPipeline" if xl else "StableDiffusionControlNetPipeline"
    guided = "MapGuidedControlNetXLPipeline" if xl else "MapGuidedControlNetPipeline"
    # SDXL pipelines have no safety checker; their VAE decodes in fp32 by itself (force_upcast)
    extra_kw = "" if xl else "safety_checker=None, "
    size = cfg.data.resolution
    names = cfg.conditions
    if multi:
        load = (
            "from diffusers.pipelines.controlnet import MultiControlNetModel\n\n"
            f'controlnet = MultiControlNetModel.from_pretrained("{run.name}/controlnet")'
        )
        hint = f"hint = [{', '.join(names)}]  # each (1, 3, {size}, {size}) in [0, 1]"
    else:
        load = f'controlnet = ControlNetModel.from_pretrained("{run.name}/controlnet")'
        hint = (
            f"hint = torch.cat([{', '.join(names)}], dim=1)  "
            f"# (1, {3 * len(names)}, {size}, {size}) in [0, 1], this order"
        )
    unet = ""
    if cfg.model.unet_trainable == "lora":
        unet = f'pipe.load_lora_weights("{run.name}/unet_lora")\n'
    elif cfg.model.unet_trainable != "none":
        unet = (
            f'pipe.unet = UNet2DConditionModel.from_pretrained("{run.name}/unet", '
            'torch_dtype=torch.float16).to("cuda")\n'
        )
    code = (
        "import torch\n"
        f"from diffusers import ControlNetModel, {pipeline}, "
        + ("UNet2DConditionModel, " if cfg.model.unet_trainable not in ("none", "lora") else "")
        + "UniPCMultistepScheduler\n\n"
        f"{load}\n"
        f"pipe = {pipeline}.from_pretrained(\n"
        f'    "{base}", controlnet=controlnet, {extra_kw}torch_dtype=torch.float16\n'
        ').to("cuda")\n'
        f"{unet}"
        "pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)\n"
        f"{hint}\n"
        'image = pipe("a photo of a happy face", image=hint, '
        f"height={size}, width={size}, num_inference_steps=30).images[0]\n"
    )
    extra = " ".join(f"--{n} {n}.png" for n in names if n != "flame")
    why_not = comfyui_problem(run)
    if why_not:
        comfy = (
            f"**The exported files will not load in ComfyUI or A1111 as trained**: {why_not}. "
            "Their loaders build only ControlNets of SD 1.5 / 2.x / SDXL shape; train on such "
            "a base to share the net there."
        )
    elif multi or len(names) == 1:
        comfy = (
            "Copy each `controlnet_<condition>.safetensors` into `ComfyUI/models/controlnet/` "
            "(A1111: `extensions/sd-webui-controlnet/models/`), load the base checkpoint, and "
            "chain one *Apply ControlNet* per condition with its RGB map as the image (apply it "
            "to the negative conditioning with a black image for `infer`'s guidance over the maps)."
        )
    else:
        comfy = (
            f"`controlnet.safetensors` loads in ComfyUI (`models/controlnet/`) and A1111, which "
            f"read its {3 * len(names)} hint channels from `input_hint_block.0.weight`; their "
            "hint inputs are RGB images, though, so drive this stacked net with `controlnet-emo "
            "infer` or diffusers. Train with `model.controlnet.mode: multi` for one RGB net per "
            "condition."
        )
    return "\n".join(
        [
            "## Use it",
            "",
            "### controlnet-emo",
            "",
            "```bash",
            f"controlnet-emo infer --model {run.name} --flame flame.png {extra} "
            '--prompt "a photo of a happy face" --out face.png'.replace("  ", " "),
            "```",
            "`--reference photo.jpg` derives the depth and skeleton maps from a photo; missing maps "
            "are zeros.",
            "",
            "### diffusers",
            "",
            "```python",
            code.rstrip(),
            "```",
            "",
            (
                "The original-layout file (SDXL's `label_emb` keys for the added embeddings, as "
                "ComfyUI reads them) loads with `controlnet_emo.export.formats.load_single_file"
                "(file)`; diffusers' own `ControlNetModel.from_single_file` does not map an SDXL "
                "ControlNet's `label_emb` yet, so in plain diffusers load the `controlnet/` folder."
                if xl
                else "The original-layout file loads with `ControlNetModel.from_single_file("
                f'file, config="{run.name}/controlnet")`.'
            ),
            "",
            "This stock pipeline draws what `controlnet-emo infer --no-map-guidance` draws. "
            "`infer` also guides over the maps (its unconditional branch sees zeroed maps), which "
            "makes faces follow their renders more closely: use "
            f"`controlnet_emo.models.pipeline.{guided}` in place of "
            f"`{pipeline}` for the same images.",
            "",
            "### ComfyUI / A1111",
            "",
            comfy,
            "",
        ]
    )


def comfyui_problem(run: Path) -> str | None:
    """Why ComfyUI's loader would not build the run's ControlNet as trained (None: it would,
    or the run has no saved net yet): the card must not promise what the file cannot do."""
    from diffusers import ControlNetModel
    from diffusers.configuration_utils import FrozenDict

    from controlnet_emo.export.formats import comfyui_compatibility

    for folder in (run / "controlnet", run / "controlnet_0"):
        if (folder / "config.json").is_file():
            config = FrozenDict(ControlNetModel.load_config(folder))
            return comfyui_compatibility(SimpleNamespace(config=config))
    return None


def _last_metrics(run: Path) -> dict | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("loss"), int | float):
            return row
    return None


def _step_of(path: Path) -> int:
    m = re.fullmatch(r"step-(\d+)\.png", path.name)
    return int(m.group(1)) if m else -1


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
