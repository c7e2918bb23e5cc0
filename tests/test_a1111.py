"""The real script and A1111 adapter, driven through a faithful fake of the WebUI.

Numbers checked: a fused step equals ``compose`` applied to branch predictions computed
by model copies with each LoRA merged into the weights; runs without composed LoRAs
are bit-identical to runs without the extension; the model's state dict is bit-identical
after runs, errors and interrupts.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file

from loratorio.fusion import METHODS, compose, method_options
from loratorio.routing import attached
from loratorio.settings import Settings
from tests import fake_a1111 as fa
from tests.fake_a1111.model import TinySD
from tests.lora_files import conv_and_linear_shapes, write_lora, write_raw

STEPS = 4


def lora_layers(model):
    """Kohya layer names and weight shapes of the tiny model's UNet and text-encoder layers."""
    unet = conv_and_linear_shapes(model.model.diffusion_model, "lora_unet_",
                                  include=["attn", "proj", "ff", "in_layers", "emb_layers", "label_emb"])
    te = {}
    encoders = model.text_encoders()
    for i, (_, wrapped) in enumerate(encoders):
        prefix = "lora_te_" if len(encoders) == 1 else f"lora_te{i + 1}_"
        for name, shape in conv_and_linear_shapes(wrapped, "", include=["self_attn", "mlp"]).items():
            te[prefix + name.removeprefix("transformer_")] = shape
    return unet, te


def te_key(layer, mapping):
    """The model layer a kohya text-encoder key names (the fake loader's rule)."""
    if layer.startswith("lora_te1_"):
        return "0_transformer_" + layer[len("lora_te1_"):]
    if layer.startswith("lora_te2_"):
        return "1_" + layer[len("lora_te2_"):]
    rest = layer[len("lora_te_"):]
    return "transformer_" + rest if ("transformer_" + rest) in mapping else rest


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: thread hand-offs cost more than they save on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    if fa.DEVICE != "cpu":  # GPU runs: exact float32 and repeatable kernels, so the tolerances below hold
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model():
    return TinySD().to(fa.DEVICE)


@pytest.fixture
def lora_dir(tmp_path, model):
    unet, te = lora_layers(model)
    write_lora(tmp_path / "style.safetensors", {**unet, **te}, rank=4, seed=11)
    write_lora(tmp_path / "char.safetensors", {**unet, **te}, rank=2, seed=22, std=0.3)
    write_lora(tmp_path / "third.safetensors", unet, rank=3, seed=33)
    return tmp_path


@pytest.fixture
def fake(monkeypatch, model, lora_dir):
    return fa.install(monkeypatch, model=model, lora_dir=lora_dir)


def args(**kw):
    return Settings(**{"enabled": True, **kw}).to_args()


def state_dict_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, reference):
    now = model.state_dict()
    assert set(now) == set(reference)
    for k, v in reference.items():
        assert torch.equal(now[k], v), k


def hooks_left(model):
    return [name for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or attached(m)]


def generate(fake, runner, script_args, **kw):
    kw.setdefault("steps", STEPS)
    kw.setdefault("negative_prompt", "blurry, ugly")
    p = fa.make_p(fake, runner, script_args, **kw)
    return p, fake.processing.process_images(p)


class Spy:
    """cfg callbacks around LoRAtorio's: inputs of each step, base rows before, fused rows after."""

    def __init__(self, fake):
        self.steps = []
        self.fake = fake

    def register_before(self):
        cb = self.fake.script_callbacks
        cb.on_cfg_denoiser(self.denoiser)
        cb.on_cfg_denoised(self.denoised_before)

    def register_after(self):
        self.fake.script_callbacks.on_cfg_denoised(self.denoised_after)

    def denoiser(self, params):
        uncond = params.text_uncond["crossattn"] if isinstance(params.text_uncond, dict) else params.text_uncond
        self.steps.append({"x": params.x.clone(), "sigma": params.sigma.clone(),
                           "image_cond": params.image_cond.clone(), "eval": params.denoiser.step,
                           "denoiser": params.denoiser, "hr": params.denoiser.p.is_hr_pass,
                           "n_uncond": uncond.shape[0]})

    def _host_rows(self, x_out):
        """The denoiser's own cond and uncond rows (LoRAtorio's branch rows sit between them in its call)."""
        step = self.steps[-1]
        n_cond = step["x"].shape[0] - step["n_uncond"]
        step["branch_rows"] = x_out.shape[0] - step["x"].shape[0]
        return torch.cat([x_out[:n_cond], x_out[x_out.shape[0] - step["n_uncond"]:]]).clone()

    def denoised_before(self, params):
        self.steps[-1]["base"] = self._host_rows(params.x)

    def denoised_after(self, params):
        self.steps[-1]["fused"] = self._host_rows(params.x)


def merged_copy(model, files, te_mult=1.0, unet_mult=1.0):
    """A copy of ``model`` with LoRA files merged into its weights (reference, from the raw tensors)."""
    m = copy.deepcopy(model)
    fake_networks = __import__("networks")
    fake_networks.assign_network_names_to_compvis_modules(m)
    mapping = m.network_layer_mapping
    for path in files:
        sd = load_file(str(path))
        layers = {k.split(".")[0] for k in sd}
        for layer in layers:
            if layer.startswith("lora_unet_"):
                key, mult = "diffusion_model_" + layer[len("lora_unet_"):], unet_mult
            else:
                key, mult = te_key(layer, mapping), te_mult
            if f"{layer}.lora_up.weight" in sd:
                up, down = sd[f"{layer}.lora_up.weight"], sd[f"{layer}.lora_down.weight"]
                scale = sd[f"{layer}.alpha"].item() / down.shape[0]
                delta = up.flatten(1) @ down.flatten(1)
            else:
                w1 = sd[f"{layer}.hada_w1_a"] @ sd[f"{layer}.hada_w1_b"]
                w2 = sd[f"{layer}.hada_w2_a"] @ sd[f"{layer}.hada_w2_b"]
                scale = sd[f"{layer}.alpha"].item() / sd[f"{layer}.hada_w1_b"].shape[0]
                delta = w1 * w2
            module = mapping.get(key)
            if module is None:
                _base, _, _part = key.rpartition("_")
                attn_key, proj = key[: -len("_q_proj")], key[-6:]
                module = mapping[attn_key]
                i = {"q_proj": 0, "k_proj": 1, "v_proj": 2}[proj]
                e = module.embed_dim
                with torch.no_grad():
                    module.in_proj_weight[i * e:(i + 1) * e] += (mult * scale * delta.reshape(e, -1)).to(
                        module.in_proj_weight.device)
                continue
            with torch.no_grad():
                module.weight += (mult * scale * delta.reshape(module.weight.shape)).to(module.weight.device)
    return m


def size(fake, texts, width=32, height=32):
    return fake.prompt_parser.SdConditioning(texts, width=width, height=height)


def condition(text, image_cond):
    if isinstance(text, dict):
        return {**text, "c_concat": [image_cond]}
    return {"c_crossattn": [text], "c_concat": [image_cond]}


def reference_step(fake, step, files_mults, prompt, negative, settings, denoised=True):
    """compose() of branch predictions from merged model copies, for one recorded step."""
    from tests.fake_a1111.modules.sd_samplers_kdiffusion import CompVisDenoiser
    from tests.fake_a1111.modules.sd_samplers_timesteps import CompVisTimestepsDenoiser

    base = step["base"]
    n_img = base.shape[0] // 2
    x, sigma, ic = step["x"], step["sigma"], step["image_cond"]
    preds_c, preds_u = [], []
    for path, te_mult, unet_mult in files_mults:
        m = merged_copy(fake.shared.sd_model, [path], te_mult, unet_mult)
        wrap = CompVisDenoiser(m) if denoised else CompVisTimestepsDenoiser(m)
        c = m.get_learned_conditioning(size(fake, [prompt] * n_img))
        uc = m.get_learned_conditioning(size(fake, [negative] * n_img))
        preds_c.append(wrap(x[:n_img], sigma[:n_img], cond=condition(c, ic[:n_img])))
        preds_u.append(wrap(x[n_img:], sigma[n_img:], cond=condition(uc, ic[n_img:])))
    options = method_options(settings.method)
    if options.get("joint") and len(files_mults) > 1:
        # the merged row: every LoRA applied at once (UNet and text encoder), as a merge computes it
        m = fake.shared.sd_model
        for path, te_mult, unet_mult in files_mults:
            m = merged_copy(m, [path], te_mult, unet_mult)
        wrap = CompVisDenoiser(m) if denoised else CompVisTimestepsDenoiser(m)
        c = m.get_learned_conditioning(size(fake, [prompt] * n_img))
        uc = m.get_learned_conditioning(size(fake, [negative] * n_img))
        options["merged_cond"] = wrap(x[:n_img], sigma[:n_img], cond=condition(c, ic[:n_img]))
        options["merged_uncond"] = wrap(x[n_img:], sigma[n_img:], cond=condition(uc, ic[n_img:]))
    return compose(base[:n_img], torch.stack(preds_c), base[n_img:], torch.stack(preds_u), step=step["k"],
                   x=x[:n_img] if denoised else None, patch_size=settings.patch_size,
                   temperature_scale=settings.temperature_scale, recenter=settings.recenter, top_k=settings.top_k,
                   **options)


# -- the numbers ---------------------------------------------------------------------------------------


def assert_branch_conds_match_merged_copies(fake, state, files, prompt, negative):
    """Per-branch text conditioning (routed / temporarily merged) equals a merged copy's."""
    from loratorio import host_a1111, host_a1111_text

    conds = host_a1111_text._branch_conds(state, host_a1111.A1111Bridge(), [prompt], [negative], 32, 32, STEPS, None,
                                          "check")
    for j, (path, te_mult, unet_mult) in enumerate(files):
        m = merged_copy(fake.shared.sd_model, [path], te_mult, unet_mult)
        for got, text in ((conds.cond[j].batch[0][0].schedules[0].cond, prompt),
                          (conds.uncond[j][0][0].cond, negative)):
            want = m.get_learned_conditioning(size(fake, [text]))
            if isinstance(want, dict):
                for key in want:
                    torch.testing.assert_close(got[key], want[key][0], atol=2e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(got, want[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_fused_step_equals_compose_of_merged_branches(fake, lora_dir, sampler):
    spy = Spy(fake)
    spy.register_before()
    _, runner = fa.load_script(fake)
    spy.register_after()
    settings = Settings(enabled=True, recenter=0.5, temperature_scale=10.0, patch_size=2)
    p, res = generate(fake, runner, settings.to_args(), prompt="a red cat <lora:style:0.8> <lora:char:1:0.6>",
                      batch_size=2, sampler_name=sampler)
    assert not fake.errors.reported, fake.errors.reported
    assert len(spy.steps) == STEPS
    assert p.loratorio_state.names == ["style", "char"]
    files = [(lora_dir / "style.safetensors", 0.8, 0.8), (lora_dir / "char.safetensors", 1.0, 0.6)]
    assert_branch_conds_match_merged_copies(fake, p.loratorio_state, files, "a red cat", "blurry, ugly")
    for k in (0, 2, 3):
        step = spy.steps[k]
        step["k"] = k
        assert step["eval"] == k
        ref = reference_step(fake, step, files, "a red cat", "blurry, ugly", settings, denoised=sampler == "Euler")
        fused = step["fused"]
        scale = step["base"].abs().max()
        assert not torch.equal(fused, step["base"])
        torch.testing.assert_close(fused[:2], ref.cond, atol=2e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(fused[2:], ref.uncond, atol=2e-5 * scale, rtol=1e-4)
    assert "LoRAtorio LoRAs: \"style, char\"" in res.info


def test_base_rows_untouched_and_model_restored(fake, model):
    reference = state_dict_copy(model)
    spy = Spy(fake)
    spy.register_before()
    _, runner = fa.load_script(fake)
    spy.register_after()
    generate(fake, runner, args(recenter=0.0), prompt="a cat <lora:style>")
    assert_same_state(model, reference)
    assert not hooks_left(model)
    # recenter 0: the uncond rows are the base model's, bit for bit
    for step in spy.steps:
        assert torch.equal(step["fused"][1:], step["base"][1:])
        assert not torch.equal(step["fused"][:1], step["base"][:1])


def test_base_rows_and_cond_cache_unaffected_by_composition(fake):
    spy = Spy(fake)
    spy.register_before()
    _, runner = fa.load_script(fake)
    # the built-in alone (its LoRA text conds go into the WebUI's shared cond cache)
    _, builtin_a = generate(fake, runner, Settings().to_args(), prompt="a cat <lora:style>", seed=2)
    spy.steps.clear()
    generate(fake, runner, args(), prompt="a cat <lora:style>", seed=2)
    composed_first = spy.steps[0]
    spy.steps.clear()
    generate(fake, runner, Settings().to_args(), prompt="a cat", seed=2)
    plain_first = spy.steps[0]
    # step 0 sees the same x: the base rows of the composed run are the plain model's. They share one
    # call with the branch rows, which no adapter touches; a larger batch only changes float rounding.
    assert torch.equal(composed_first["x"], plain_first["x"])
    assert composed_first["branch_rows"] > 0
    torch.testing.assert_close(composed_first["base"], plain_first["base"], rtol=1e-5, atol=1e-5)
    _, builtin_b = generate(fake, runner, Settings().to_args(), prompt="a cat <lora:style>", seed=2)
    assert torch.equal(builtin_a.latents, builtin_b.latents)


def test_no_composed_lora_is_bit_identical_to_no_extension(fake):
    _, runner = fa.load_script(fake)
    _, plain = generate(fake, runner, Settings().to_args(), prompt="a cat <lora:missing:0.5>", seed=5, batch_size=2)
    p, on = generate(fake, runner, args(), prompt="a cat <lora:missing:0.5>", seed=5, batch_size=2)
    assert torch.equal(plain.latents, on.latents)
    assert "not found" in p.extra_generation_params["LoRAtorio skipped"]
    assert "plain generation" in p.extra_generation_params["LoRAtorio note"]
    _, untagged = generate(fake, runner, args(), prompt="a cat", seed=5, batch_size=2)
    _, untagged_off = generate(fake, runner, Settings().to_args(), prompt="a cat", seed=5, batch_size=2)
    assert torch.equal(untagged.latents, untagged_off.latents)


def test_builtin_kept_off_composed_tags(fake, model):
    seen = []
    fake.script_callbacks.on_cfg_denoiser(lambda params: seen.append(
        ([n.name for n in __import__("networks").loaded_networks], dict(params.denoiser.p.extra_network_data))))
    _, runner = fa.load_script(fake)
    p, res = generate(fake, runner, args(), prompt="a cat <lora:style>")
    assert seen and all(names == [] and "lora" not in data for names, data in seen)
    assert "Lora hashes" in res.info and "style: " in p.extra_generation_params["Lora hashes"]
    # nothing merged: every patched layer still has no backup of the built-in's merge
    assert all(getattr(m, "network_weights_backup", None) is None for m in model.modules())


def test_merge_into_base_stays_with_builtin(fake, lora_dir):
    _, runner = fa.load_script(fake)
    _, plain = generate(fake, runner, Settings().to_args(), prompt="a cat <lora:style:0.7>", seed=3)
    p, merged_only = generate(fake, runner, args(merge_into_base=["style"]), prompt="a cat <lora:style:0.7>", seed=3)
    assert torch.equal(plain.latents, merged_only.latents)
    assert p.loratorio_state.plan.merged == ["style"]
    # with a composed branch next to it, the merged LoRA is in the base rows of every step
    spy = Spy(fake)
    spy.register_before()
    p, _ = generate(fake, runner, args(merge_into_base=["style"]), prompt="a cat <lora:style:0.7> <lora:char>")
    assert [n.name for n in __import__("networks").loaded_networks] == ["style"]
    assert p.loratorio_state.names == ["char"]


def test_second_order_sampler_uses_the_same_step_twice(fake, monkeypatch):
    from loratorio import engine

    steps = []
    original = engine.Composer.fuse

    def record(self, **kw):
        steps.append(kw["step"])
        return original(self, **kw)

    monkeypatch.setattr(engine.Composer, "fuse", record)
    _, runner = fa.load_script(fake)
    generate(fake, runner, args(), prompt="a cat <lora:style>", sampler_name="Heun")
    assert steps == [0, 0, 1, 1, 2, 2, 3]
    steps.clear()
    generate(fake, runner, args(), prompt="a cat <lora:style>", sampler_name="Euler")
    assert steps == [0, 1, 2, 3]  # although the WebUI's sampling_step reads 0, 0, 1, 2


def test_and_prompt_batch_layout(fake, lora_dir):
    spy = Spy(fake)
    spy.register_before()
    _, runner = fa.load_script(fake)
    spy.register_after()
    settings = Settings(enabled=True)
    _p, _ = generate(fake, runner, settings.to_args(), prompt="a cat AND a hat :0.5 <lora:style>", batch_size=2)
    assert not fake.errors.reported, fake.errors.reported
    step = spy.steps[2]
    assert step["x"].shape[0] == 6  # 2 images x 2 sub-prompts + 2 uncond
    base, fused, x = step["base"], step["fused"], step["x"]
    m = merged_copy(fake.shared.sd_model, [lora_dir / "style.safetensors"])
    from tests.fake_a1111.modules.sd_samplers_kdiffusion import CompVisDenoiser

    wrap = CompVisDenoiser(m)
    c = m.get_learned_conditioning(["a cat", "a hat", "a cat", "a hat"])
    uc = m.get_learned_conditioning(["blurry, ugly"] * 2)
    ic = step["image_cond"]
    pc = wrap(x[:4], step["sigma"][:4], cond={"c_crossattn": [c], "c_concat": [ic[:4]]})
    pu = wrap(x[4:], step["sigma"][4:], cond={"c_crossattn": [uc], "c_concat": [ic[4:]]})
    rows = torch.tensor([0, 0, 1, 1])
    ref = compose(base[:4], pc[None], base[4:][rows], pu[rows][None], step=2, x=x[:4], recenter=settings.recenter,
                  **method_options(settings.method))
    torch.testing.assert_close(fused[:4], ref.cond, atol=1e-5, rtol=1e-4)
    expected_uncond = torch.stack([(ref.uncond[0] * 1 + ref.uncond[1] * 0.5) / 1.5,
                                   (ref.uncond[2] * 1 + ref.uncond[3] * 0.5) / 1.5])
    torch.testing.assert_close(fused[4:], expected_uncond, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["chunked", "max_rows", "long_prompt"])
def test_chunked_calls_give_the_same_result(fake, variant):
    _, runner = fa.load_script(fake)
    prompt = "a cat <lora:style> <lora:char>"
    if variant == "long_prompt":  # 2 token chunks for the prompt, 1 for the negative: calls split by length
        prompt = "a very fluffy orange cat sitting on a red velvet sofa <lora:style> <lora:char>"
    _, ref = generate(fake, runner, args(), prompt=prompt, batch_size=2)
    if variant == "chunked":
        fake.shared.opts.batch_cond_uncond = False
        settings = args()
    else:
        settings = args(max_rows_per_call=1 if variant == "max_rows" else 0)
    _, out = generate(fake, runner, settings, prompt=prompt, batch_size=2)
    assert not fake.errors.reported, fake.errors.reported
    torch.testing.assert_close(out.latents, ref.latents, atol=1e-4, rtol=1e-4)


def test_skip_uncond_steps(fake):
    spy = Spy(fake)
    spy.register_before()
    _, runner = fa.load_script(fake)
    spy.register_after()
    _p, _ = generate(fake, runner, args(), prompt="a cat <lora:style>", s_min_uncond=100.0)
    assert not fake.errors.reported, fake.errors.reported
    skipped = [s for s in spy.steps if s["eval"] % 2]
    assert skipped
    for s in skipped:
        # the fake uncond row follows the fused first cond row, which CFG with scale 1 then returns
        assert torch.equal(s["fused"][1:], s["fused"][:1])
        assert not torch.equal(s["fused"][:1], s["base"][:1])


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_hires_pass_restarts_the_schedule(fake, monkeypatch, sampler):
    from loratorio import engine

    steps = []
    original = engine.Composer.fuse
    monkeypatch.setattr(engine.Composer, "fuse", lambda self, **kw: (steps.append(kw["step"]), original(self, **kw))[1])
    spy = Spy(fake)
    spy.register_before()
    _, runner = fa.load_script(fake)
    _p, res = generate(fake, runner, args(), prompt="a cat <lora:style>", enable_hr=True, hr_second_pass_steps=3,
                      hr_prompt="a cat, detailed <lora:style>", sampler_name=sampler)
    assert not fake.errors.reported, fake.errors.reported
    # k-diffusion's img2img pass evaluates t_enc + 1 sigmas, the timestep samplers t_enc timesteps
    hires_calls = int(0.6 * 3) + (1 if sampler == "Euler" else 0)
    assert steps == [0, 1, 2, 3, *list(range(hires_calls))]
    assert [s["hr"] for s in spy.steps] == [False] * 4 + [True] * hires_calls
    assert res.latents.shape[-1] == 8


def test_img2img(fake, model):
    reference = state_dict_copy(model)
    _, runner = fa.load_script(fake)
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    _, off = generate(fake, runner, Settings().to_args(), cls="img2img", init_latent=init, prompt="a cat <lora:style>")
    _, on = generate(fake, runner, args(), cls="img2img", init_latent=init, prompt="a cat <lora:style>")
    assert not fake.errors.reported
    assert not torch.equal(on.latents, off.latents)
    assert_same_state(model, reference)


# -- failures -----------------------------------------------------------------------------------------------


def test_exception_in_branch_call_stops_cleanly(fake, model, monkeypatch):
    from loratorio import routing

    reference = state_dict_copy(model)
    _, runner = fa.load_script(fake)
    _, clean = generate(fake, runner, args(), prompt="a cat <lora:style>", seed=7)
    calls = {"n": 0}
    original = routing.Router.route

    def flaky(self, rows, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (injected)")
        return original(self, rows, **kwargs)

    monkeypatch.setattr(routing.Router, "route", flaky)
    p, _res = generate(fake, runner, args(), prompt="a cat <lora:style>", seed=7)
    assert fake.shared.state.interrupted
    assert "injected" in p.extra_generation_params["LoRAtorio note"]
    assert any("injected" in c for c in p.comments)
    assert any("injected" in str(msg) for msg, _ in fake.errors.reported)
    assert not hooks_left(model)
    assert_same_state(model, reference)
    monkeypatch.setattr(routing.Router, "route", original)
    _, again = generate(fake, runner, args(), prompt="a cat <lora:style>", seed=7)
    assert torch.equal(again.latents, clean.latents)


def test_exception_inside_forward_removes_hooks(fake, model, monkeypatch):
    reference = state_dict_copy(model)
    _, runner = fa.load_script(fake)
    target = model.model.diffusion_model.middle_block[1].proj_in
    state = {"armed": False}

    def boom(module, args, output):
        if state["armed"] and attached(module):  # only inside a routed call
            raise KeyError("injected inside the UNet")

    handle = target.register_forward_hook(boom)
    state["armed"] = True
    # the branch rows ride in the host's own model call: its error is the host's, after LoRAtorio noted it
    p = fa.make_p(fake, runner, args(), prompt="a cat <lora:style>", steps=STEPS, negative_prompt="blurry, ugly")
    with pytest.raises(KeyError, match="injected inside the UNet"):
        fake.processing.process_images(p)
    handle.remove()
    assert "injected inside the UNet" in p.extra_generation_params["LoRAtorio note"]
    assert not hooks_left(model)
    assert_same_state(model, reference)


def test_interrupt_leaves_nothing_attached(fake, model):
    reference = state_dict_copy(model)
    _, runner = fa.load_script(fake)
    count = {"n": 0}

    def interrupt(params):
        count["n"] += 1
        if count["n"] == 2:
            fake.shared.state.interrupt()

    fake.script_callbacks.on_cfg_denoised(interrupt)
    p, res = generate(fake, runner, args(), prompt="a cat <lora:style>", n_iter=2)
    assert len(res.images) == 1  # the interrupted batch is decoded, the next one never starts
    assert not hooks_left(model)
    assert_same_state(model, reference)
    assert p.loratorio_state.composer is None and p.loratorio_state.router is None


def test_bad_loras_are_skipped_with_reasons(fake, lora_dir, model):
    unet, _te = lora_layers(model)
    write_lora(lora_dir / "nan.safetensors", unet, seed=5, poison="nan")
    write_raw(lora_dir / "notalora.safetensors", {"model.weight": torch.randn(3, 3)})
    wrong = {k: (s[0] + 1, *s[1:]) for k, s in unet.items() if "to_q" in k}
    write_lora(lora_dir / "otherarch.safetensors", wrong, seed=6)
    (lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    fake.networks.list_available_networks()
    _, runner = fa.load_script(fake)
    prompt = ("a cat <lora:style> <lora:nan> <lora:notalora> <lora:otherarch> <lora:broken> <lora:ghost> "
              "<lora:char:0> <lora:style:0.3> <lora:third:abc>")
    p, res = generate(fake, runner, args(), prompt=prompt)
    skipped = p.loratorio_state.skipped
    assert p.loratorio_state.names == ["style"]
    assert "NaN" in skipped["nan"]
    assert "matches no layer" in skipped["notalora"]
    assert "does not fit" in skipped["otherarch"]
    assert "could not be loaded" in skipped["broken"]
    assert "not found" in skipped["ghost"]
    assert "multipliers are 0" in skipped["char"]
    assert "<lora:third:abc>" in skipped
    assert "LoRAtorio skipped" in res.info and "ghost: not found" in res.info
    assert any("skipped ghost" in c for c in p.comments)


def test_invalid_settings_refuse_the_job(fake):
    _, runner = fa.load_script(fake)
    p, res = generate(fake, runner, [{"recenter": 2}], prompt="a cat <lora:style>")
    assert res.images == []
    assert "recenter" in p.extra_generation_params["LoRAtorio note"]
    assert any("between 0 and 1" in c for c in p.comments)
    p, res = generate(fake, runner, [{"top_k": 1, "colour": "red"}], prompt="a cat")
    assert res.images == [] and "colour" in p.extra_generation_params["LoRAtorio note"]
    _, ok = generate(fake, runner, args(), prompt="a cat <lora:style>")
    assert len(ok.images) == 1


def test_refiner_is_refused_and_builtin_takes_the_tags(fake):
    _, runner = fa.load_script(fake)
    _, plain = generate(fake, runner, Settings().to_args(), prompt="a cat <lora:style>", seed=9)
    p, res = generate(fake, runner, args(), prompt="a cat <lora:style>", seed=9, refiner_checkpoint_info=object())
    assert "refiner" in p.extra_generation_params["LoRAtorio note"]
    assert torch.equal(res.latents, plain.latents)


def test_edit_model_is_refused(fake, model):
    model.cond_stage_key = "edit"
    _, runner = fa.load_script(fake)
    p, _ = generate(fake, runner, args(), prompt="a cat <lora:style>")
    assert "edit models" in p.extra_generation_params["LoRAtorio note"]


# -- cache, map, infotext, API, XYZ -------------------------------------------------------------------------


def test_cache_reuses_and_notices_replaced_files_and_model_change(fake, lora_dir, model, monkeypatch):
    from loratorio import host_a1111

    loads = []
    original = host_a1111.A1111Bridge.load_lora

    def counting(self, lora_file):
        loads.append(lora_file.name)
        return original(self, lora_file)

    monkeypatch.setattr(host_a1111.A1111Bridge, "load_lora", counting)
    _, runner = fa.load_script(fake)
    generate(fake, runner, args(), prompt="a cat <lora:style> <lora:char>")
    assert loads == ["style", "char"]
    generate(fake, runner, args(), prompt="a cat <lora:style> <lora:char>")
    assert loads == ["style", "char"]
    unet, _te = lora_layers(model)
    write_lora(lora_dir / "style.safetensors", unet, rank=4, seed=99)
    os.utime(lora_dir / "style.safetensors", ns=(1, 2_000_000_000_000_000_000))
    fake.networks.list_available_networks()
    generate(fake, runner, args(), prompt="a cat <lora:style> <lora:char>")
    assert loads == ["style", "char", "style"]
    fa.set_model(fake, TinySD(seed=1).to(fa.DEVICE))
    assert len(host_a1111.CACHE) == 0
    generate(fake, runner, args(), prompt="a cat <lora:style>")
    assert loads[-1] == "style" and len(loads) == 4
    fake.shared.opts.loratorio_cache_mb = 0
    generate(fake, runner, args(), prompt="a cat <lora:style>")
    assert len(loads) == 5 and len(host_a1111.CACHE) == 0


def test_composition_map_images_follow_the_main_ones(fake):
    _, runner = fa.load_script(fake)
    p, res = generate(fake, runner, args(composition_map=True), prompt="a cat <lora:style> <lora:char>",
                      batch_size=2)
    assert len(res.images) == 4 and len(res.infotexts) == 4
    assert all(im.size == res.images[0].size for im in res.images)
    assert res.images[2].tobytes() != res.images[0].tobytes()
    maps = p.loratorio_state.maps
    assert len(maps) == 2 and maps[0][0].shape[0] == 2
    # the default method's map holds each LoRA's gate, averaged over the steps
    assert maps[0][0].min() >= 0 and maps[0][0].max() <= 1 + 1e-6 and maps[0][0].max() > 0.5


def test_infotext_round_trip(fake):
    from tests.fake_a1111.modules.infotext_utils import parse_generation_parameters

    _, runner = fa.load_script(fake)
    settings = Settings(enabled=True, recenter=0.25, temperature_scale=7.5, patch_size=3, top_k=1, probe_every=2,
                        text_encoder_per_branch=False, pool=["third"], composition_map=True, max_rows_per_call=4)
    _, res = generate(fake, runner, settings.to_args(), prompt="a cat <lora:style> <lora:char>")
    params = parse_generation_parameters(res.infotexts[0])
    assert params["LoRAtorio LoRAs"] == "style, char, third"
    assert Settings.from_infotext(params) == settings.to_dict()


def test_api_dict_form_and_defaults(fake):
    _, runner = fa.load_script(fake)
    padded = [{"recenter": 0.0, "top_k": 1}, *Settings().to_args()[1:]]
    p, _res = generate(fake, runner, padded, prompt="a cat <lora:style> <lora:char>")
    s = p.loratorio_state.settings
    assert s.enabled and s.recenter == 0.0 and s.top_k == 1 and s.patch_size == 2
    assert p.loratorio_state.names == ["style", "char"]


def options_choices(xyz_grid, label: str) -> list:
    option = next(o for o in xyz_grid.axis_options if o.label == label)
    return list(option.choices())


def test_xyz_axes_override_settings(fake):
    from tests.fake_a1111 import xyz_grid

    _, runner = fa.load_script(fake)
    fake.script_callbacks.before_ui_callback()
    fake.script_callbacks.before_ui_callback()  # a UI reload must not add them twice
    labels = [o.label for o in xyz_grid.axis_options if o.label.startswith("[LoRAtorio]")]
    assert labels == ["[LoRAtorio] Enabled", "[LoRAtorio] Lambda (re-centring)", "[LoRAtorio] Temperature scale",
                      "[LoRAtorio] Patch size", "[LoRAtorio] Top-k", "[LoRAtorio] Composition method"]
    assert options_choices(xyz_grid, "[LoRAtorio] Composition method") == list(METHODS)
    options = {o.label: o for o in xyz_grid.axis_options}
    p = fa.make_p(fake, runner, Settings().to_args(), prompt="a cat <lora:style> <lora:char>", steps=STEPS)
    seen = {}

    def run(pc):
        res = fake.processing.process_images(pc)
        seen["settings"] = pc.loratorio_state.settings
        return res

    xyz_grid.run_cell(p, [(options["[LoRAtorio] Enabled"], "True"), (options["[LoRAtorio] Top-k"], "1")], run)
    assert seen["settings"].enabled and seen["settings"].top_k == 1
    method_axis = options["[LoRAtorio] Composition method"]
    xyz_grid.run_cell(p, [(options["[LoRAtorio] Enabled"], "True"), (method_axis, "paper")], run)
    assert seen["settings"].method == "paper"
    assert not hasattr(p, "loratorio_overrides")  # the grid's copy carries them, not the original
    xyz_grid.run_cell(p, [(options["[LoRAtorio] Enabled"], "True"), (options["[LoRAtorio] Patch size"], "0")],
                      fake.processing.process_images)
    assert fake.shared.state.interrupted  # an invalid axis value refuses the cell


def test_loha_and_openclip_text_encoder(monkeypatch, tmp_path):
    model = TinySD(text_encoder="openclip", seed=3).to(fa.DEVICE)
    reference = state_dict_copy(model)
    unet, te = lora_layers(model)
    te = {k: v for k, v in te.items()}
    qkv = {}
    for name, shape in te.items():
        if name.endswith("_attn_out_proj") or "mlp" in name:
            qkv[name] = shape
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            qkv[f"lora_te_model_transformer_resblocks_{i}_attn_{proj}"] = (32, 32)
    write_lora(tmp_path / "clipy.safetensors", {**unet, **qkv}, seed=4, std=0.3)
    write_lora(tmp_path / "hada.safetensors", {k: v for k, v in unet.items() if len(v) == 2}, seed=5, kind="loha")
    fake = fa.install(monkeypatch, model=model, lora_dir=tmp_path)
    spy = Spy(fake)
    spy.register_before()
    _, runner = fa.load_script(fake)
    spy.register_after()
    settings = Settings(enabled=True)
    p, _ = generate(fake, runner, settings.to_args(), prompt="a cat <lora:clipy> <lora:hada:0.7>")
    assert not fake.errors.reported, fake.errors.reported
    assert p.loratorio_state.names == ["clipy", "hada"]
    assert_same_state(model, reference)
    step = dict(spy.steps[2], k=2)
    files = [(tmp_path / "clipy.safetensors", 1.0, 1.0), (tmp_path / "hada.safetensors", 0.7, 0.7)]
    assert set(p.loratorio_state.branches[0].te_merge) == {"model_transformer_resblocks_0_attn",
                                                           "model_transformer_resblocks_1_attn"}
    assert_branch_conds_match_merged_copies(fake, p.loratorio_state, files[:1], "a cat", "blurry, ugly")
    assert_same_state(model, reference)
    ref = reference_step(fake, step, files, "a cat", "blurry, ugly", settings)
    scale = step["base"].abs().max()
    torch.testing.assert_close(step["fused"][:1], ref.cond, atol=2e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(step["fused"][1:], ref.uncond, atol=2e-5 * scale, rtol=1e-4)


def test_sdxl_two_text_encoders_and_dict_conds(monkeypatch, tmp_path):
    model = TinySD(text_encoder="sdxl", seed=4).to(fa.DEVICE)
    reference = state_dict_copy(model)
    unet, te = lora_layers(model)
    qkv = {f"lora_te2_model_transformer_resblocks_{i}_attn_{p}": (32, 32) for i in range(2)
           for p in ("q_proj", "k_proj", "v_proj")}
    write_lora(tmp_path / "xl_a.safetensors", {**unet, **te, **qkv}, seed=8, std=0.3)
    write_lora(tmp_path / "xl_b.safetensors", {**unet, **te}, seed=9, rank=2)
    fake = fa.install(monkeypatch, model=model, lora_dir=tmp_path)
    spy = Spy(fake)
    spy.register_before()
    _, runner = fa.load_script(fake)
    spy.register_after()
    settings = Settings(enabled=True, max_rows_per_call=3)
    p, _ = generate(fake, runner, settings.to_args(), prompt="a cat <lora:xl_a:0.9> <lora:xl_b:0.6:1.2>",
                    batch_size=2)
    assert not fake.errors.reported, fake.errors.reported
    branches = p.loratorio_state.names
    assert branches == ["xl_a", "xl_b"]
    assert_same_state(model, reference)
    assert not hooks_left(model)
    step = dict(spy.steps[2], k=2)
    files = [(tmp_path / "xl_a.safetensors", 0.9, 0.9), (tmp_path / "xl_b.safetensors", 0.6, 1.2)]
    assert_branch_conds_match_merged_copies(fake, p.loratorio_state, files, "a cat", "blurry, ugly")
    assert_same_state(model, reference)
    ref = reference_step(fake, step, files, "a cat", "blurry, ugly", settings)
    scale = step["base"].abs().max()
    torch.testing.assert_close(step["fused"][:2], ref.cond, atol=2e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(step["fused"][2:], ref.uncond, atol=2e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize(("width", "height", "patch"), [(40, 56, 2), (32, 32, 16), (24, 40, 3)])
def test_odd_latent_sizes_and_large_patches(fake, model, width, height, patch):
    reference = state_dict_copy(model)
    _, runner = fa.load_script(fake)
    _, res = generate(fake, runner, args(patch_size=patch, top_k=1, composition_map=True),
                      prompt="a cat <lora:style:-0.5> <lora:char> <lora:third:0.7>", width=width, height=height)
    assert not fake.errors.reported, fake.errors.reported
    assert res.latents.shape[-2:] == (height // 8, width // 8)
    assert torch.isfinite(res.latents).all()
    assert len(res.images) == 2 and res.images[1].size == res.images[0].size
    assert_same_state(model, reference)


def test_pool_top_k_and_probing_evaluate_fewer_branches(fake, monkeypatch):
    from loratorio import routing

    active = []
    original = routing.Router.route

    def record(self, rows, **kwargs):
        active.append(sum(r is not None for r in rows))
        return original(self, rows, **kwargs)

    monkeypatch.setattr(routing.Router, "route", record)
    _, runner = fa.load_script(fake)
    p, res = generate(fake, runner, args(pool=["third", "char"], top_k=1, probe_every=2),
                      prompt="a cat <lora:style>")
    assert p.loratorio_state.names == ["style", "third", "char"]
    unet_calls = [n for n in active if n]  # text-encoder passes route one branch with all rows
    assert unet_calls[-4:] == [3, 1, 3, 1]
    assert "LoRAtorio pool: \"third, char\"" in res.info


@pytest.mark.skipif(fa.DEVICE == "cpu", reason="half precision runs on a GPU (LORATORIO_FAKE_DEVICE=cuda)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet(monkeypatch, tmp_path, dtype):
    model = TinySD().to(fa.DEVICE)
    model.model.diffusion_model.to(dtype)
    reference = state_dict_copy(model)
    unet, te = lora_layers(model)
    write_lora(tmp_path / "a.safetensors", {**unet, **te}, seed=1)
    write_lora(tmp_path / "b.safetensors", {**unet, **te}, seed=2, rank=2)
    fake = fa.install(monkeypatch, model=model, lora_dir=tmp_path)
    spy = Spy(fake)
    spy.register_before()
    _, runner = fa.load_script(fake)
    spy.register_after()
    settings = Settings(enabled=True, max_rows_per_call=2)
    p, res = generate(fake, runner, settings.to_args(), prompt="a cat <lora:a:0.8> <lora:b>", batch_size=2)
    assert not fake.errors.reported, fake.errors.reported
    assert p.loratorio_state.names == ["a", "b"]
    assert torch.isfinite(res.latents).all()
    assert_same_state(model, reference)
    assert not hooks_left(model)
    step = dict(spy.steps[2], k=2)
    files = [(tmp_path / "a.safetensors", 0.8, 0.8), (tmp_path / "b.safetensors", 1.0, 1.0)]
    ref = reference_step(fake, step, files, "a cat", "blurry, ugly", settings)
    scale = step["base"].abs().max()
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(step["fused"][:2], ref.cond, atol=tol * scale, rtol=tol)


def test_webui_before_1_8_callbacks_without_denoiser(fake, monkeypatch):
    """1.6/1.7: CFGDenoiserParams has no ``denoiser``; the generation in progress is found by the script."""
    _, runner = fa.load_script(fake)
    _, new = generate(fake, runner, args(), prompt="a cat <lora:style> <lora:char>", seed=4)
    original = fake.sd_samplers_cfg_denoiser.CFGDenoiserParams

    class OldParams(original):
        def __init__(self, *a):
            super().__init__(*a[:7])
            del self.denoiser

    monkeypatch.setattr(fake.sd_samplers_cfg_denoiser, "CFGDenoiserParams", OldParams)
    p, old = generate(fake, runner, args(), prompt="a cat <lora:style> <lora:char>", seed=4)
    assert not fake.errors.reported, fake.errors.reported
    assert p.loratorio_state.names == ["style", "char"]
    assert torch.equal(new.latents, old.latents)


# -- one model call per composed step ------------------------------------------------------------------


def _calls_per_evaluation(fake, model, runner, settings, **kw):
    """UNet calls per denoiser evaluation of one generation, and the evaluations' count."""
    evaluations = []
    fake.script_callbacks.on_cfg_denoiser(lambda params: evaluations.append(params.denoiser.step))
    unet = model.model.diffusion_model
    before = unet.calls
    _p, res = generate(fake, runner, settings, **kw)
    assert not fake.errors.reported, fake.errors.reported
    return (unet.calls - before) / len(evaluations), res


@pytest.mark.parametrize("case", ["euler", "ddim", "heun", "and", "ngms", "early_skip", "hires", "img2img",
                                  "lambda0", "sdxl"])
def test_one_model_call_per_composed_step(monkeypatch, tmp_path, case):
    """The branch rows ride in the host's own call: a composed evaluation costs one UNet call, as a plain one."""
    model = TinySD("sdxl" if case == "sdxl" else "clip").to(fa.DEVICE)
    unet, te = lora_layers(model)
    write_lora(tmp_path / "style.safetensors", {**unet, **te}, rank=4, seed=11)
    write_lora(tmp_path / "char.safetensors", {**unet, **te}, rank=2, seed=22, std=0.3)
    fake = fa.install(monkeypatch, model=model, lora_dir=tmp_path)
    _, runner = fa.load_script(fake)
    kw = {"prompt": "a cat <lora:style> <lora:char>", "batch_size": 2}
    settings = args()
    if case in ("ddim", "heun"):
        kw["sampler_name"] = case.upper() if case == "ddim" else "Heun"
    elif case == "and":
        kw["prompt"] = "a cat AND a hat :0.5 <lora:style> <lora:char>"
    elif case == "ngms":
        kw["s_min_uncond"] = 100.0
    elif case == "early_skip":
        fake.shared.opts.skip_early_cond = 0.5
    elif case == "hires":
        kw.update(enable_hr=True, hr_second_pass_steps=3, hr_prompt="a cat, detailed <lora:style> <lora:char>")
    elif case == "img2img":
        kw.update(cls="img2img", init_latent=torch.randn(2, 4, 4, 4, device=fa.DEVICE))
    elif case == "lambda0":
        settings = args(recenter=0.0)
    per_eval, res = _calls_per_evaluation(fake, model, runner, settings, **kw)
    assert per_eval == 1
    assert "LoRAtorio LoRAs" in res.info


@pytest.mark.parametrize("variant", ["chunked", "long_prompt", "max_rows"])
def test_host_features_that_keep_the_branch_call_apart(fake, model, variant):
    """Where the host itself calls the model in pieces, or max-rows caps a call, the branches keep their own call."""
    _, runner = fa.load_script(fake)
    prompt = "a cat <lora:style> <lora:char>"
    settings = args()
    if variant == "chunked":
        fake.shared.opts.batch_cond_uncond = False  # the host: one call per image batch (2 rows)
        host_calls = 2
    elif variant == "long_prompt":  # token lengths differ: the host calls cond and uncond apart
        prompt = "a very fluffy orange cat sitting on a red velvet sofa <lora:style> <lora:char>"
        host_calls = 2
    else:
        settings = args(max_rows_per_call=3)  # 2 base + 2x2 branch rows do not fit 3: branch rows in 2 calls
        host_calls = 1
    per_eval, _ = _calls_per_evaluation(fake, model, runner, settings, prompt=prompt, batch_size=1)
    branch_calls = 1 if variant == "chunked" else 2  # long prompt: branch cond and uncond rows apart too
    assert per_eval == host_calls + branch_calls
