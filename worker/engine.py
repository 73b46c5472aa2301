"""The engine thread's entry points: everything here touches MLX and runs on that thread only
(``tokenize`` excepted: it uses the tokenizer alone)."""

import gc

import mlx.core as mx

from . import generate as _generate
from . import model as _model
from .protocol import Done, Load, Progress, Tokenize


class LoadCancelled(Exception):
    pass


def load(req: Load, emit, cancelled) -> _model.ModelKit:
    release_memory()

    def progress(fraction: float):
        if cancelled():
            raise LoadCancelled()
        emit(Progress(id=req.id, stage="load", fraction=fraction))

    kit = _model.load(req.model_path, req.options, progress)
    emit(Progress(id=req.id, stage="load", fraction=1.0))
    return kit


def load_draft(kit, req, emit, cancelled):
    def progress(fraction: float):
        if cancelled():
            raise LoadCancelled()
        emit(Progress(id=req.id, stage="load", fraction=fraction))

    draft = _model.load_draft(kit, req.model_path, progress)
    emit(Progress(id=req.id, stage="load", fraction=1.0))
    return draft


def release_memory() -> None:
    gc.collect()
    mx.clear_cache()


def tokenize(kit: _model.ModelKit, req: Tokenize) -> Done:
    ids = kit.tokenizer.encode(req.text, add_special_tokens=req.add_special_tokens)
    return Done(id=req.id, request="tokenize", tokens=[int(t) for t in ids])


def generate(kit, req, emit, cancelled) -> Done:
    return _generate.run(kit, req, emit, cancelled)
