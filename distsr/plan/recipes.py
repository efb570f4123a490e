"""Workload builders, one per recipe: the network calls of its ``training_step`` in order."""

from __future__ import annotations

import torch

from distsr.models.discriminator import TimeAwareDiscriminator
from distsr.models.resshift import MIDDLE, encoder_features, net_call
from distsr.plan.networks import META, resshift_model, seesr_denoiser, seesr_student
from distsr.plan.workload import Backward, Call, Net, Workload, default_gt_size, meta, steps_t


def resshift_parts(spec, gt: int, batch: int):
    """(model, cond, z shape, eps net call, features call) of a ResShift spec on meta."""
    model = resshift_model(spec)
    with torch.no_grad():
        cond = model.prepare(meta(batch, 3, gt // spec.scale, gt // spec.scale))
    z_shape = tuple(cond["z_y"].shape[1:])

    def eps(net, g, t, b=batch):  # one network call x0 = f(z_t / s, t, lq) (models.resshift)
        return net_call(
            net,
            meta(b, *z_shape, grad=g),
            steps_t(b, t),
            cond["lq"][:1].expand(b, *cond["lq"].shape[1:]),
        )

    def features(net, g, t, levels):
        return encoder_features(
            net, meta(batch, *z_shape, grad=g), steps_t(batch, t), cond["lq"], levels
        )

    return model, cond, z_shape, eps, features


def resshift_workload(name: str, cfg) -> Workload:
    """``recipes.resshift``: prepare (first-stage encode of lq_up and gt), one UNet forward +
    backward at a uniform t (x0-prediction loss)."""
    spec, batch = cfg.method, cfg.data.batch_size
    gt, gt_source = default_gt_size(cfg)
    model, cond, z_shape, eps, _ = resshift_parts(spec, gt, batch)
    nets = {
        "unet": Net(model.unet.train(), "trained", ema=True),
        "autoencoder": Net(model.autoencoder, "frozen"),
    }
    T = model.diffusion.num_timesteps
    encode = [
        Call(
            "encode lq_up",
            "autoencoder",
            "none",
            lambda g: model.prepare(meta(batch, 3, gt // spec.scale, gt // spec.scale)),
        ),
        Call("encode gt", "autoencoder", "none", lambda g: model.encode_gt(meta(batch, 3, gt, gt))),
    ]
    step = [
        *encode,
        Call("unet", "unet", "params", lambda g: eps(model.unet, g, T - 1), "unet"),
        Backward("unet"),
    ]
    infer = [
        Call(f"unet x {T} steps", "unet", "none", lambda g: eps(model.unet, g, T - 1, 1), times=T),
        Call("decode", "autoencoder", "none", lambda g: model.decode(meta(1, *z_shape))),
    ]
    w = Workload(name, cfg.recipe, batch, gt, nets, step, infer_teacher=infer)
    w.notes.append(f"gt crop {gt} from {gt_source}")
    return w


def tadsr_levels(cfg) -> list:
    return [*cfg.disc.levels, *([MIDDLE] if cfg.disc.include_middle else [])]


def tadsr_teacher(cfg, gt: int, batch: int):
    """The parts of either teacher kind, as a dict: teacher (its denoiser), student, first
    (stage, or None), z_shape, fields (stored cond shapes), eps / features (call makers), steps,
    passes (2 with classifier-free guidance), t, first_calls, notes, stored."""
    t_cfg = cfg.teacher
    if t_cfg.kind == "seesr":
        return seesr_parts(t_cfg, gt, batch)
    from distsr.teachers.resshift import ResShiftTeacher

    model, cond, z_shape, eps, features = resshift_parts(t_cfg, gt, batch)
    teacher = ResShiftTeacher(t_cfg, model)  # frozen, as built for training
    student = teacher.make_student()
    fields = {"z_y": tuple(cond["z_y"].shape[1:])}
    first = model.autoencoder if t_cfg.autoencoder.kind != "pixel" else None
    calls = {
        "encode": lambda g: (
            model.prepare(meta(1, 3, gt // t_cfg.scale, gt // t_cfg.scale)),
            model.encode_gt(meta(1, 3, gt, gt)),
        ),
        "decode": lambda g: model.decode(meta(1, *z_shape)),
    }
    return dict(
        teacher=teacher.unet,
        student=student,
        first=first,
        z_shape=z_shape,
        fields=fields,
        eps=eps,
        features=features,
        steps=model.diffusion.num_timesteps,
        passes=1,
        t=model.diffusion.num_timesteps - 1,
        first_calls=calls,
        notes=[],
        stored=ResShiftTeacher.stored,
    )


def seesr_parts(t_cfg, gt: int, batch: int):
    from distsr.teachers.seesr import SeeSRTeacher

    denoiser, source = seesr_denoiser(t_cfg)
    student = seesr_student(t_cfg, denoiser)
    z_shape = (denoiser.unet.config.in_channels, gt // 8, gt // 8)  # SD-2 VAE f8
    ram = t_cfg.ram_model
    width = denoiser.unet.config.cross_attention_dim
    tokens = 77  # SD-2's CLIP tokenizer model_max_length
    fields = {
        "z_lq": z_shape,
        "image_embeds": (ram.num_tokens, ram.embed_width),
        "prompt_embeds": (tokens, width),
    }

    def cond(b):
        return {
            "prompt_embeds": meta(b, tokens, width),
            "image_embeds": meta(b, *fields["image_embeds"]),
            "lq_up": meta(b, 3, gt, gt),
        }

    def eps(net, g, t, b=batch):
        return net(meta(b, *z_shape, grad=g), steps_t(b, t), cond(b))

    def features(net, g, t, levels):
        return net.features(meta(batch, *z_shape, grad=g), steps_t(batch, t), cond(batch), levels)

    notes = [
        f"SeeSR UNet + ControlNet from {source}",
        "SeeSR: RAM, the CLIP text encoder and the VAE are not counted (FLOPs, memory)",
    ]
    return dict(
        teacher=denoiser,
        student=student,
        first=None,
        z_shape=z_shape,
        fields=fields,
        eps=eps,
        features=features,
        steps=t_cfg.steps,
        passes=2 if t_cfg.guidance_scale > 1 else 1,
        t=t_cfg.student_timestep,
        first_calls={},
        notes=notes,
        stored=SeeSRTeacher.stored,
    )


def tadsr_workload(name: str, cfg) -> Workload:
    """``recipes.tadsr`` from the cache: student step; disc update (teacher features of fake and
    real, no grad; disc on both); HSD (two teacher x0 predictions, no grad); generator
    (features of the student output through the frozen teacher encoder, frozen disc)."""
    m, batch = cfg.method, cfg.data.batch_size
    gt, gt_source = default_gt_size(cfg)
    p = tadsr_teacher(m, gt, batch)
    levels = tadsr_levels(m)
    from distsr.models.resshift import feature_channels as resshift_channels
    from distsr.models.seesr import feature_channels as seesr_channels

    chans = (
        seesr_channels(p["teacher"].unet, levels)
        if m.teacher.kind == "seesr"
        else resshift_channels(p["teacher"], levels)
    )
    with META:
        disc = TimeAwareDiscriminator(chans, **m.disc.kwargs)
    nets = {
        "student": Net(p["student"], "trained", ema=True),
        "disc": Net(disc, "trained"),
        "teacher": Net(p["teacher"], "teacher"),
    }
    if p["first"] is not None:
        nets["first_stage"] = Net(p["first"], "frozen")
    t, eps, feats, tch = p["t"], p["eps"], p["features"], p["teacher"]
    shapes: list = []  # the feature shapes, from the first features call (it runs first)

    def features(g):  # one function: counted once for fake, real and the generator
        out = feats(tch, g, 0, levels)
        shapes[:] = [tuple(f.shape) for f in out]
        return out

    def disc_call(g):
        return disc([meta(*s, grad=g) for s in shapes], steps_t(batch, 0))

    runs: dict = {}

    def run(net: str, b: int):  # one function per (net, batch): its forward is counted once
        return runs.setdefault((net, b), lambda g: eps(nets[net].module, g, t, b))

    step = [
        Call("student (1 step)", "student", "params", run("student", batch), "student"),
        Call("teacher features: fake", "teacher", "none", features),
        Call("teacher features: real", "teacher", "none", features),
        Call("disc: fake", "disc", "params", disc_call, "disc"),
        Call("disc: real", "disc", "params", disc_call, "disc"),
        Backward("disc"),
        Call("HSD teacher x0: student", "teacher", "none", run("teacher", batch)),
        Call("HSD teacher x0: teacher", "teacher", "none", run("teacher", batch)),
        Call("teacher features: student (grad to input)", "teacher", "input", features, "student"),
        Call("disc frozen (grad to input)", "disc", "input", disc_call, "student"),
        Backward("student"),
    ]
    steps, passes = p["steps"], p["passes"]
    cfg_label = " x 2 (CFG: batch doubled)" if passes > 1 else ""
    sampler = Call(f"teacher x {steps} steps{cfg_label}", "teacher", "none", run("teacher", 1),
                   times=steps * passes)  # fmt: skip
    first = p["first_calls"] if p["first"] is not None else {}
    cache = [sampler] + (
        [Call("encode lq_up + gt", "first_stage", "none", first["encode"])] if first else []
    )
    decode = [Call("decode", "first_stage", "none", first["decode"])] if first else []
    student_call = Call("student (1 step)", "student", "none", run("student", 1))
    w = Workload(
        name,
        cfg.recipe,
        batch,
        gt,
        nets,
        step,
        cache_sample=cache,
        infer_teacher=[sampler, *decode],
        infer_student=[student_call, *decode],
    )
    w.draws = 1
    w.cache_fields = {
        "z0": ((w.draws, *p["z_shape"]), "float16"),
        "z_gt": (p["z_shape"], "float16"),
        **{k: (p["fields"][k], "float16") for k in p["stored"]},
        "seed": ((w.draws,), "int64"),
    }
    w.notes += [
        f"gt crop {gt} from {gt_source}",
        *p["notes"],
        "training step from the teacher cache (method.cache_dir); live: add the "
        "cache FLOPs per sample x batch",
    ]
    return w


def kd_workload(name: str, cfg) -> Workload:
    from distsr.plan.kd import kd_workload as build

    return build(name, cfg)


BUILDERS = {"resshift": resshift_workload, "tadsr": tadsr_workload, "dtkd": kd_workload,
            "mtkd": kd_workload}  # fmt: skip
