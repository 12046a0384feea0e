"""``controlnet-emo app``: the engine (inputs -> maps -> face -> reading) on a tiny run with
the shipped evaluation critic, the ``/generate`` endpoint through ``gradio_client`` against a
launched app, and the command's refusal without a run. The browser test is
``test_app_browser.py``."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet_emo.app.engine import (
    DEMO_CRITIC,
    NO_DEMO,
    AppError,
    Engine,
    circumplex,
    critic_spec,
    upscale,
)
from controlnet_emo.cli.main import main
from controlnet_emo.config import Config, load_config
from controlnet_emo.export.model_info import ModelInfo
from controlnet_emo.inference.infer import infer
from controlnet_emo.labels import EXPRESSION_WORDS, EXPRESSIONS
from tests.conftest import write_prepared
from tests.runs import SIZE, make_run

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")


def make_app_run(root: Path) -> Path:
    """A tiny run whose config points at a small prepared dataset (2 held-out samples), drawing
    with 2 steps so every face costs well under a second on a CPU."""
    run, _ = make_run(root / "run")
    data = write_prepared(root / "data")
    cfg = load_config(run / "config.yaml")
    cfg.data.root = str(data)
    cfg.train.validation_steps = 2
    cfg.save(run / "config.yaml")
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_app_run(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def engine(run) -> Engine:
    return Engine(run, critic=DEMO_CRITIC, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# engine


def test_gallery_lists_the_held_out_samples_with_their_captions(engine, run):
    cfg = load_config(run / "config.yaml")
    rows = [
        json.loads(x) for x in (Path(cfg.data.root) / "metadata.jsonl").read_text().splitlines()
    ]
    val = [r for r in rows if r["split"] == "val"]
    assert [h.record.file_name for h in engine.held_out] == [r["file_name"] for r in val]
    for h, r in zip(engine.held_out, val, strict=True):
        assert h.render.is_file() and h.render.parent.name == "flame"
        assert h.caption.endswith(EXPRESSIONS[r["expression"]])
        # the sample's own text, else the caption template with its expression
        word = EXPRESSION_WORDS[r["expression"]]
        assert h.prompt == (r["text"] or f"a photo of a {word} face")


def test_a_run_with_relative_paths_finds_its_data_from_any_folder(tmp_path, monkeypatch):
    """As `make demo` leaves it: output_dir runs/demo, data.root runs/demo/data, both relative
    to the project; the app started elsewhere with --model /abs/.../runs/demo still finds them."""
    run, _ = make_run(tmp_path / "project" / "runs" / "x")
    write_prepared(run / "data")
    cfg = load_config(run / "config.yaml")
    cfg.output_dir, cfg.data.root = "runs/x", "runs/x/data"
    cfg.save(run / "config.yaml")
    monkeypatch.chdir(tmp_path)
    found = Engine(run.resolve(), critic=DEMO_CRITIC, device="cpu")
    assert found.data == run.resolve() / "data" and len(found.held_out) == 2


def test_the_app_draws_the_face_infer_draws_for_the_same_seed(engine, tmp_path):
    h = engine.held_out[0]
    maps, target = engine.held_out_maps(0)
    assert maps.shape == (9, SIZE, SIZE) and target.shape == (3, SIZE, SIZE)
    s = engine.sampling(seed=5)
    face = engine.draw(maps, h.prompt, s)
    paths = {c: h.root / f for c, f in h.record.maps.items()}
    out = infer(
        engine.model,
        paths["flame"],
        h.prompt,
        tmp_path / "face.png",
        s,
        depth=paths["depth"],
        skeleton=paths["skeleton"],
        device="cpu",
    )[0]
    assert face.size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(face), np.asarray(Image.open(out).convert("RGB")))
    other = engine.draw(maps, h.prompt, engine.sampling(seed=6))
    assert not np.array_equal(np.asarray(face), np.asarray(other))


def test_guidance_over_the_maps_is_switched_per_request(engine):
    maps, _ = engine.held_out_maps(1)
    on = engine.draw(maps, "a face", engine.sampling(map_guidance=True))
    off = engine.draw(maps, "a face", engine.sampling(map_guidance=False))
    again = engine.draw(maps, "a face", engine.sampling(map_guidance=True))
    assert not np.array_equal(np.asarray(on), np.asarray(off))
    assert np.array_equal(np.asarray(on), np.asarray(again))


def test_a_bad_setting_is_one_line_naming_it(engine):
    with pytest.raises(AppError, match="--steps 0"):
        engine.sampling(steps=0)
    with pytest.raises(AppError, match="--scale colour"):
        engine.sampling(scales={"colour": 1.0})


def test_the_critic_reading_is_a_distribution_and_a_point_on_the_circumplex(engine):
    maps, target = engine.held_out_maps(0)
    face = engine.draw(maps, "a photo of a happy face", engine.sampling())
    (mine, theirs) = engine.read([face, target])
    assert list(mine.probabilities) == list(EXPRESSIONS)
    assert sum(mine.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert mine.probability == max(mine.probabilities.values())
    assert mine.expression in EXPRESSIONS
    assert (mine.valence, mine.arousal) != (theirs.valence, theirs.arousal)
    d = mine.as_dict()
    assert {"expression", "probability", "valence", "arousal"} <= set(d)


def test_uploads_of_any_size_and_mode_are_resized_and_a_non_image_is_a_message(engine, tmp_path):
    Image.new("RGBA", (200, 150), (255, 0, 0, 128)).save(tmp_path / "flame.png")
    grey16 = (np.linspace(0, 65535, 90 * 90).reshape(90, 90)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "depth.png")
    maps = engine.upload_maps(tmp_path / "flame.png", tmp_path / "depth.png")
    assert maps.shape == (9, SIZE, SIZE)
    assert torch.allclose(maps[0], torch.ones(SIZE, SIZE))  # red, alpha dropped
    assert maps[3:6].std() > 0.1  # the 16-bit ramp, not clipped to white
    assert maps[6:].abs().sum() == 0  # no skeleton: zeros, as in condition dropout
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(AppError, match=r"the depth upload is not an image \(notes.png\)"):
        engine.upload_maps(tmp_path / "flame.png", tmp_path / "notes.png")
    with pytest.raises(AppError, match="upload a FLAME render"):
        engine.upload_maps(None)


def test_a_photo_without_its_depth_weights_is_a_message_not_a_crash(engine, tmp_path):
    Image.new("RGB", (80, 80), (120, 90, 70)).save(tmp_path / "photo.jpg")
    with pytest.raises(AppError, match="^the photo: "):
        engine.photo_maps(tmp_path / "photo.jpg")
    (tmp_path / "photo.txt").write_text("hello")
    with pytest.raises(AppError, match=r"the photo is not an image \(photo.txt\)"):
        engine.photo_maps(tmp_path / "photo.txt")


def test_flame_codes_are_moved_towards_the_expression_and_rendered(engine, run, tmp_path):
    from conditioners.codes import ExpressionMeans
    from controlnet_emo.synthetic.flame import (
        class_codes,
        face_codes,
        write_codes,
        write_synthetic_flame,
    )

    model = write_synthetic_flame(tmp_path / "generic_model.npz")
    codes = tmp_path / "codes" / "a"
    write_codes(
        codes,
        face_codes(0, 10.0, 0.0, np.random.default_rng(0)),
        np.array([7.0, 0.0, 0.01], np.float32),
    )
    with pytest.raises(AppError, match=r"expression_codes\.npz"):
        engine.codes_maps(model, codes, "happy", 0.5)  # prepare wrote no class means yet
    exp, jaw = np.zeros((8, 50), np.float32), np.zeros((8, 3), np.float32)
    for e in range(8):
        exp[e], jaw[e, 0] = class_codes(e)
    exp[1, 0], jaw[1, 0] = 4.0, 0.4  # 'happy': a wide smile, jaw open
    ExpressionMeans(exp, jaw, np.full(8, 3)).save(engine.data / "expression_codes.npz")
    still = engine.codes_maps(model, codes, "happy", 0.0)
    moved = engine.codes_maps(model, codes, "happy", 1.0)
    assert still.shape == moved.shape == (9, SIZE, SIZE)
    assert still[:3].std() > 0.05  # a face was rendered
    assert (still[:3] - moved[:3]).abs().mean() > 1e-3  # the render changed with the edit
    with pytest.raises(AppError, match="needs a FLAME model file"):
        engine.codes_maps(None, codes, "happy", 0.5)
    with pytest.raises(AppError, match="strength 1.5"):
        engine.codes_maps(model, codes, "happy", 1.5)


def test_strips_over_strength_and_expression_are_labelled_sheets(engine):
    maps, _ = engine.held_out_maps(0)
    s = engine.sampling(seed=2)
    sheet, reads = engine.strength_strip(maps, "a photo of a happy face", s)
    assert sheet.size == (5 * 256, 256) and len(reads) == 5
    tiles = [np.asarray(sheet)[40:, i * 256 : (i + 1) * 256] for i in range(5)]  # below labels
    assert not np.array_equal(tiles[0], tiles[-1])  # the FLAME map's strength changes the face
    sheet, reads = engine.expression_strip(maps, s)
    assert sheet.size == (4 * 256, 2 * 256) and len(reads) == 8


def test_small_faces_are_shown_upscaled_without_invented_detail():
    face = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    big = upscale(face)
    assert big.size == (256, 256)
    assert np.array_equal(np.asarray(big)[::4, ::4], np.asarray(face))  # nearest neighbour


def test_the_circumplex_puts_the_point_where_valence_and_arousal_say():
    def red_in_upper_half(valence: float) -> np.ndarray:
        pic = np.asarray(circumplex([("generated", valence, 0.6, "red")])).astype(int)
        red = (pic[..., 0] > 200) & (pic[..., 1] < 60) & (pic[..., 2] < 60)
        red[red.shape[0] // 2 :] = False  # the legend's marker sits in the lower right
        assert red.sum() > 20
        return np.nonzero(red)[1] / red.shape[1]  # x of each red pixel, 0..1

    assert red_in_upper_half(0.8).mean() > 0.6  # pleasant: right of centre
    assert red_in_upper_half(-0.8).mean() < 0.45  # unpleasant: left


def test_the_critic_defaults_to_the_one_the_run_did_not_train_against():
    cfg = Config()
    cfg.model.emonet = "demo-critic-train"
    demo = ModelInfo(conditions=["flame"], base_model="demo-face-base", run_dir=Path("r"))
    assert critic_spec(demo, cfg, None) == (DEMO_CRITIC, [])
    other = ModelInfo(conditions=["flame"], base_model="sd15", run_dir=Path("r"))
    spec, warnings = critic_spec(other, cfg, None)
    assert spec == "demo-critic-train" and "trained against" in warnings[0]
    assert critic_spec(other, cfg, DEMO_CRITIC) == (DEMO_CRITIC, [])
    for term in ("valence", "arousal", "expression"):  # a run that never read a critic
        setattr(cfg.loss.emotion, term, 0.0)
    assert critic_spec(other, cfg, None) == ("demo-critic-train", [])


# ---------------------------------------------------------------------------------------------
# the command


def test_app_without_a_run_exits_2_saying_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    assert main(["app"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and NO_DEMO in err and "make demo" in err
    assert main(["app", "--model", "nowhere"]) == 2
    assert "--model nowhere: no such run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the /generate endpoint, through gradio_client against a launched app


@pytest.fixture(scope="module")
def served(run):
    from controlnet_emo.app.ui import launch

    port = free_port()
    page = launch(str(run), port=port, critic=DEMO_CRITIC, device="cpu", prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


def test_generate_endpoint_returns_the_face_and_the_critic_reading(served, engine, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False)
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in api["/generate"]["parameters"]] == [
        "render",
        "prompt",
        "seed",
    ]
    render = engine.held_out[0].render
    face, reading = client.predict(
        handle_file(str(render)), "a photo of a happy face", 3, api_name="/generate"
    )
    reading = json.loads(reading)
    assert reading["expression"] in EXPRESSIONS
    assert 0 < reading["probability"] <= 1 and reading["seed"] == 3
    assert {"valence", "arousal"} <= set(reading)
    # the face the page's engine draws from the same render alone, prompt and seed
    maps = engine.upload_maps(render)
    want = engine.draw(maps, "a photo of a happy face", engine.sampling(seed=3))
    assert np.array_equal(np.asarray(Image.open(face).convert("RGB")), np.asarray(want))
    assert reading["valence"] == pytest.approx(engine.read([want])[0].valence, abs=1e-3)


def test_generate_endpoint_answers_a_bad_upload_with_a_message(served, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError as ClientError

    (tmp_path / "render.png").write_text("not a picture")
    client = Client(served, verbose=False)
    with pytest.raises(ClientError, match="render: render.png is not an image"):
        client.predict(handle_file(str(tmp_path / "render.png")), "a face", 0, api_name="/generate")
