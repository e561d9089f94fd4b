"""Knowledge distillation: a student classifier learns from the labels and from a teacher's softened
slice-level outputs (Hinton et al., 2015).

The teacher is a registered version of the classifier, typically ``resnet3d-slim`` over deeper slabs;
the student, typically ``mobilenet-v3-small`` over the preprocessing's slabs. Both score slices,
so the supervision is slice to slice: for every training slab of the student, the teacher scores
its own slab (its depth, its input size) centred on the same slice of the same series, and the
student matches that softened distribution. The series-level decision of both is the same rule
over slice scores (the mean of the top k), so nothing series-level needs distilling separately.

The teacher can also be the nodule segmenter (``distill_from`` = ``dicomops-ct-nodule-seg/V``): it
scores no slabs, so its slice targets are its actionable call read slice by slice
(:mod:`dicomops.segmentation.teacher`).

Cross-validation stays honest: the student's fold ``i`` learns from the teacher's fold-``i`` model,
which never saw fold ``i``'s validation series; the final student from the teacher's final model.
Hence the teacher must have been trained on the same split of the same accepted corpus, and on
volumes preprocessed with the same settings (the slab depth may differ); the fold models come
from its fold runs' ``weights/`` artifacts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dicomops.layout import WorkLayout
from dicomops.preprocessing.stage import VOLUME_FIELDS
from dicomops.tracking import registry, runs
from dicomops.tracking.lineage import ACCEPTED_HASH_TAG
from dicomops.training.data import SlabSet, build_slab_set

# Tags that must agree between the teacher's training run and the student's.
LINEAGE_TAGS = ("split_sha256", ACCEPTED_HASH_TAG)


def distillation_loss(student_logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor, *,
                      alpha: float, temperature: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``.

    Both distributions are softmaxes at temperature T; the KL term is averaged over the batch and
    scaled by T^2, which keeps its gradients the size of the cross-entropy's whatever T is (Hinton
    et al.). `weight`: the class weights of the cross-entropy, as in training without a teacher.
    """
    ce = F.cross_entropy(student_logits, target, weight=weight)
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * ce + (1 - alpha) * t * t * kl


def logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The model's (N, 2) logits for (N, k, H, W) slabs, in float32 on the CPU."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(x[i : i + batch_size].float()).float())
    return torch.cat(out) if out else torch.zeros((0, 2))


def fold_run(tracking_uri: str, parent: str, fold: int) -> str:
    """The finished nested run of `fold` under training run `parent` (its ``weights/`` hold the fold model)."""
    client = runs.configure_mlflow(tracking_uri)
    experiment = client.get_run(parent).info.experiment_id
    found = client.search_runs([experiment], filter_string=(
        f"tags.mlflow.parentRunId = '{parent}' and tags.fold = '{fold}' and attributes.status = 'FINISHED'"))
    if not found:
        raise ValueError(f"the teacher's training run {parent} has no finished run of fold {fold}")
    return str(found[0].info.run_id)


def teacher_run(tracking_uri: str, model_name: str, version: str, student_run: str) -> str:
    """The training run of `version` of `model_name`, checked to share the student's split and corpus."""
    client = runs.configure_mlflow(tracking_uri)
    try:
        run_id = str(client.get_model_version(model_name, version).run_id)
    except Exception as err:
        raise ValueError(f"no version {version} of {model_name} to distil from: {err}") from err
    teacher, student = client.get_run(run_id).data, client.get_run(student_run).data
    for tag in LINEAGE_TAGS:
        if teacher.tags.get(tag) != student.tags.get(tag):
            raise ValueError(
                f"version {version} of {model_name} was trained with {tag} {teacher.tags.get(tag)!r}, this training "
                f"has {student.tags.get(tag)!r}: a teacher from another split or corpus would have seen the "
                f"student's validation series; retrain the teacher on this work directory first")
    changed = volume_settings_changed(teacher.params, student.params)
    if changed:
        raise ValueError(
            f"version {version} of {model_name} learnt from volumes preprocessed with other settings ({changed}): it "
            f"would teach from images it never saw in this form; retrain the teacher after this preprocessing, "
            f"or preprocess as it was trained")
    return run_id


def volume_settings_changed(teacher: dict[str, str], student: dict[str, str]) -> str:
    """The preprocessing settings that make a different volume (:data:`VOLUME_FIELDS`) on which the
    two training runs' ``preprocess.*`` parameters differ, as 'name teacher -> student'; '' if none."""
    keys = [f"preprocess.{name}" for name in VOLUME_FIELDS]
    return ", ".join(f"{key} {teacher.get(key)} -> {student.get(key)}" for key in keys
                     if teacher.get(key) != student.get(key))


def teacher_targets(layout: WorkLayout, tracking_uri: str, model_name: str, distill_from: str, student_run: str,
                    student: SlabSet, fold: int | None) -> torch.Tensor:
    """The teacher's (N, 2) logits for each slab of `student`, from its fold-`fold` model (None: its
    final model): a classifier's on its own slabs centred on the same slices, a segmenter's from its
    findings on those slices (:mod:`dicomops.segmentation.teacher`)."""
    from dicomops.segmentation import teacher as segmenter
    from dicomops.training.model import model_from_config

    name, version = registry.parse_ref(distill_from, model_name)
    run_id = teacher_run(tracking_uri, name, version, student_run)
    source = run_id if fold is None else fold_run(tracking_uri, run_id, fold)
    what = "its final model" if fold is None else f"fold {fold}"
    if segmenter.is_segmenter(tracking_uri, run_id):
        if not segmenter.is_segmenter(tracking_uri, source):
            raise ValueError(f"version {version} of {name} logged no segmenter for {what} (segmenter fold models "
                             "are logged since 2026-12-02): retrain the segmenter with 'dicomops segment'")
        return segmenter.slice_targets(layout, tracking_uri, source, student.series, student.z,
                                       f"teacher {name}/{version}, {'final' if fold is None else f'fold {fold}'}")
    try:
        model, raw = registry.load_weights(tracking_uri, source, model_from_config)
    except Exception as err:
        raise ValueError(f"version {version} of {name} has no weights for {what} (fold models are logged "
                         f"since issue 19; retrain the teacher): {err}") from err
    ids = list(dict.fromkeys(student.series))
    own = build_slab_set(layout, ids, int(raw["in_channels"]), int(raw["input_size"]))  # each slab once
    return logits(model, own.x)[torch.as_tensor(rows_for(student, own))]


def rows_for(student: SlabSet, own: SlabSet) -> list[int]:
    """For each slab of `student`, the row of `own` centred on the same slice of the same series.
    The student's set may take a slab more than once (``build_slab_set(repeats=True)``); `own`, the
    teacher's slabs of the same series, must hold exactly the student's slices."""
    row_of = {(s, int(z)): i for i, (s, z) in enumerate(zip(own.series, own.z, strict=True))}
    wanted = list(zip(student.series, (int(z) for z in student.z), strict=True))
    if set(wanted) != set(row_of) or len(row_of) != len(own.series):
        raise RuntimeError("the teacher's slabs are not centred on the student's slices; the slab table changed")
    return [row_of[w] for w in wanted]
