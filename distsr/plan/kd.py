"""Workloads of the output-distillation recipes (DTKD; MTKD stage 2): trained from the teacher
cache, as every KD preset is, a step is the student's forward + backward against the cached
output. The cache job and the teacher's inference are planned where the config builds the
teacher (DTKD's ResShift: N sampler steps, the lq encode, the decode to pixels); where its
architecture is read from weight files (SR model files, MTKD's aggregated teachers) they are
named as not planned."""

from __future__ import annotations

from distsr.plan.networks import META
from distsr.plan.workload import Backward, Call, Net, Workload, default_gt_size, meta

PRESET_CROP = 256  # the KD presets' shards: 256^2 gt crops (64^2 lq at x4)


def kd_gt_size(cfg) -> tuple[int, str]:
    if cfg.data.gt_size or getattr(cfg.method.teacher, "kind", None) == "resshift":
        return default_gt_size(cfg)
    return PRESET_CROP, "the KD presets' shard crop (data.gt_size=null: the stored crop)"


def kd_workload(name: str, cfg) -> Workload:
    from distsr.recipes.kd import build_student

    batch, spec = cfg.data.batch_size, cfg.method.student
    gt, gt_source = kd_gt_size(cfg)
    lq = gt // spec.scale
    # built on the CPU (small, and some SR constructors compute on their weights), then moved
    student = build_student(spec).to(META)

    def forward(b: int):
        return lambda g: student(meta(b, 3, lq, lq, grad=g))

    nets = {"student": Net(student, "trained", ema=True)}
    step = [Call("student", "student", "params", forward(batch), "student"), Backward("student")]
    infer_student = [Call("student", "student", "none", forward(1))]
    w = Workload(name, cfg.recipe, batch, gt, nets, step, infer_student=infer_student)
    if getattr(cfg.method.teacher, "kind", None) == "resshift":
        add_resshift_teacher(w, cfg.method.teacher, gt)
    else:
        w.notes.append("teacher cache and teacher inference not planned: the teacher's "
                       "architecture is read from its weight files")  # fmt: skip
    w.notes += [f"gt crop {gt} from {gt_source}",
                "training step from the teacher cache (method.cache_dir)"]  # fmt: skip
    return w


def add_resshift_teacher(w: Workload, spec, gt: int) -> None:
    """DTKD's ResShift teacher, cached decoded to pixels (``PixelOutputs``)."""
    from distsr.plan.recipes import resshift_parts

    model, _, z_shape, eps, _ = resshift_parts(spec, gt, 1)
    steps = model.diffusion.num_timesteps
    w.nets["teacher"] = Net(model.unet, "teacher")
    w.nets["first_stage"] = Net(model.autoencoder, "frozen")
    lq = gt // spec.scale
    sampler = Call(f"teacher x {steps} steps", "teacher", "none",
                   lambda g: eps(model.unet, g, steps - 1, 1), times=steps)  # fmt: skip
    encode = Call("encode lq_up", "first_stage", "none",
                  lambda g: model.prepare(meta(1, 3, lq, lq)))  # fmt: skip
    decode = Call("decode", "first_stage", "none", lambda g: model.decode(meta(1, *z_shape)))
    w.cache_sample = [encode, sampler, decode]
    w.infer_teacher = [encode, sampler, decode]
