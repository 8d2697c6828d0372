# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""MONAI Label app for the SAGAN bundle: infer task ``sagan`` (anomaly score, abnormal/normal, anomaly regions as
a label image) and train task ``sagan`` (SAGAN's recipe on the datastore's known-normal and unlabeled images).

Start (from the repository root, after ``bash scripts/setup_monailabel.sh``, which also makes the environment's
``monailabel`` launcher run its own python and pass quoted options on unchanged)::

    .venv-monailabel/bin/monailabel start_server --app scripts/monailabel_app \
        --studies /path/to/studies --host 127.0.0.1 --port 8000

Conf options (``--conf KEY VALUE``):
    bundle: the bundle folder (default: the repository that holds this app).
    model_dir: where the train task publishes ``model.pt`` (default: ``<studies>/.sagan``). Served: the model
        there, else the bundle's ``models/model.pt``, else the shipped pretrained model (``pretrained/``, paediatric
        chest X-rays; its sha256 is checked).
    extensions: comma-separated image patterns of the datastore (default: png, jpg, jpeg, bmp, dcm, nii, nii.gz;
        sub-folders holding DICOM files are DICOM series).
    min_region_size: smallest anomaly region, in pixels of the model's 64x64 grid (default 8).
    skip_trainers: ``true`` to serve inference only.
    bundle_python: python of the bundle's environment for training (default ``<bundle>/.venv/bin/python``).
    train_preset: ``cpu`` (default), ``paper``, ``demo`` or a config path relative to the bundle.
    train_overrides: extra arguments for the bundle's training, e.g. ``"--iterations 400 --batch_size 8"``.
    min_normal_images: fewest known-normal images training accepts (default 20).
    val_fraction: share of the known-normal images held out for validation (default 0.2).
    publish: ``better`` (default: publish a new model only if its validation ROC AUC is higher) or ``always``.
    work_dir, keep_work_dir: where training's temporary Med-AD folder goes, and whether to keep it.
    warm_up: ``false`` to skip loading the result writer (ITK, 2-5 s) at start-up; the first /infer then pays it.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

_APP_DIR = os.path.dirname(os.path.realpath(__file__))
# MONAI Label puts the app folder on sys.path only while it executes this file; lib/ is imported later (after the
# bundle folder from the conf is on sys.path), so keep one more entry.
if sys.path.count(_APP_DIR) < 2:
    sys.path.append(_APP_DIR)


def _bundle_root(conf: dict[str, str]) -> str:
    return os.path.realpath(conf.get("bundle") or os.path.join(_APP_DIR, "..", ".."))


def _import_path(path: str) -> None:
    if path not in sys.path:
        sys.path.insert(0, path)


logger = logging.getLogger(__name__)


def _pretrained_model(bundle_root: str) -> list[str]:
    """``[path]`` of the bundle's shipped pretrained model when it is there and its hash is right, else ``[]``."""
    from bundle.pretrained import pretrained_model_path

    try:
        return [pretrained_model_path(os.path.join(bundle_root, "pretrained"))]
    except FileNotFoundError:
        return []
    except ValueError as e:
        logger.error(f"not serving the pretrained model: {e}")
        return []


def _is_upload(path: str, studies: str) -> bool:
    """Whether ``path`` is the server's temporary copy of an uploaded file (not a datastore image)."""
    return not os.path.realpath(path).startswith(os.path.realpath(studies) + os.sep)


class SAGANApp(MONAILabelApp):
    """The SAGAN bundle in MONAI Label (see the module docstring for the conf options)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle_root = _bundle_root(conf)
        if not os.path.isfile(os.path.join(self.bundle_root, "configs", "inference.json")):
            raise ValueError(f"{self.bundle_root}: not the SAGAN bundle (no configs/inference.json); set conf bundle.")
        _import_path(self.bundle_root)
        from lib.server import install_log_filters

        install_log_filters()
        remote = studies.startswith(("http://", "https://"))
        default_dir = os.path.join(app_dir, "model") if remote else os.path.join(studies, ".sagan")
        self.model_dir = os.path.realpath(conf.get("model_dir") or default_dir)
        self.published_model = os.path.join(self.model_dir, "model.pt")
        # served: the last one that exists
        self.model_paths = [
            *_pretrained_model(self.bundle_root),
            os.path.join(self.bundle_root, "models", "model.pt"),
            self.published_model,
        ]
        with open(os.path.join(self.bundle_root, "metadata.json")) as f:
            version = json.load(f).get("version", "")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SAGAN anomaly detection",
            description="Anomaly score and suspect regions of 2D medical images (SAGAN, MICCAI 2024)",
            version=version,
            labels={"anomaly": 1},
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        from lib.datastore import IMAGE_EXTENSIONS, SAGANDatastore

        extensions = self.conf.get("extensions")
        return SAGANDatastore(
            self.studies,
            extensions=[e.strip() for e in extensions.split(",")] if extensions else list(IMAGE_EXTENSIONS),
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _make_infer(self):
        from lib.infers.sagan import SAGANInferTask

        task = SAGANInferTask(self.bundle_root, self.model_paths, self.conf, int(self.conf.get("min_region_size", 8)))
        if not task.is_valid():
            logger.warning(
                f"no SAGAN model yet (none of {self.model_paths}): the infer task appears once the train task "
                "(POST /train/sagan) has published one, or a model.pt is put there."
            )
            return None
        logger.info(f"infer task sagan: {task.type}, labels {task.labels}, model {task.served_path()}")
        return task

    def init_infers(self):
        task = self._make_infer()
        return {"sagan": task} if task else {}

    def init_trainers(self):
        if self.conf.get("skip_trainers", "false").lower() == "true":
            return {}
        from lib.trainers.sagan import SAGANTrainTask

        def served_path():
            existing = [p for p in self.model_paths if os.path.isfile(p)]
            return existing[-1] if existing else None

        return {"sagan": SAGANTrainTask(self.bundle_root, self.published_model, served_path, self.conf)}

    def _ensure_infer(self) -> None:
        """Creates the infer task once a model exists (e.g. published by training after the server started)."""
        if "sagan" not in self._infers and any(os.path.isfile(p) for p in self.model_paths):
            task = self._make_infer()
            if task:
                self._infers["sagan"] = task

    def info(self):
        self._ensure_infer()
        return super().info()

    def on_init_complete(self) -> None:
        """Server start-up (not run in MONAI Label's training subprocess): request hooks (train options checked on
        arrival, uploaded files named by their own name), the result writer warmed up and the served model loaded
        (CPU), so that the first ``/infer`` is as fast as the later ones (conf ``warm_up false`` skips both)."""
        from lib.server import install_request_hooks, warm_up_writer

        install_request_hooks()
        task = self._infers.get("sagan")
        if task is not None and self.conf.get("warm_up", "true").lower() != "false":
            warm_up_writer()
            try:
                task.served_model("cpu")  # the model too: read, built and cached as the first request would
            except Exception as e:  # the first request reports it
                logger.warning(f"model not loaded at start-up: {e}")
        super().on_init_complete()

    def check_train_request(self, model: str, request: dict) -> None:
        """Checks a ``POST /train/{model}`` request's options when it arrives (before MONAI Label starts the
        background training): HTTP 422 naming the option and its rule."""
        from fastapi import HTTPException

        task = self._trainers.get(model)
        if task is None or not hasattr(task, "check_request"):
            return
        try:
            task.check_request(request)
        except MONAILabelException as e:
            logger.error(f"POST /train/{model} refused: {e.msg}")
            raise HTTPException(status_code=422, detail=e.msg) from e

    def infer(self, request, datastore=None):
        """MONAI Label's infer; an image id not in the datastore becomes HTTP 404 naming it, an input the bundle
        refuses (3D without ``slice_index``, unreadable, ...) HTTP 422 with one line naming the file (an upload by
        its own name) and the reason, instead of a bare 500 or every MONAI reader's error."""
        from fastapi import HTTPException
        from lib.server import UPLOAD_NAME
        from lib.transforms import short_problem

        from bundle.transforms import BadImageError

        self._ensure_infer()
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            uri = (datastore or self.datastore()).get_image_uri(image)
            if not uri or not os.path.exists(uri):
                detail = (
                    f"image {image!r} is not in the datastore ({self.studies}); GET /datastore/?output=all lists "
                    "the image ids"
                )
                logger.error(f"POST /infer/{request.get('model')}: {detail}")
                raise HTTPException(status_code=404, detail=detail)
        try:
            return super().infer(request, datastore)
        except BadImageError as e:
            path = str(e.filename)
            upload = UPLOAD_NAME.get()
            name = upload if upload and _is_upload(path, self.studies) else path
            hint = ' (add {"slice_index": K} to the request params)' if "slice_index" in e.problem else ""
            detail = f"{name}: {short_problem(e.problem, path, name)}{hint}"
            logger.error(f"POST /infer/{request.get('model')} refused: {detail}")
            raise HTTPException(status_code=422, detail=detail) from e
        except MONAILabelException as e:
            status = 422 if e.error == MONAILabelError.INVALID_INPUT else 500
            logger.error(f"POST /infer/{request.get('model')} failed: {e.error.value}: {e.msg}")
            raise HTTPException(status_code=status, detail=f"{e.error.value}: {e.msg}") from e

    def train(self, request):
        """MONAI Label's train. A refusal or failure (too few known-normal images, the bundle's training failing,
        ...) in a synchronous request (``run_sync=true``) becomes HTTP 422 with the reason. In the usual background
        run (MONAI Label's training subprocess, not in server mode) the reason is logged as the last line, without
        a traceback, so that ``GET /train/`` (the last 20 log lines) shows it, and the subprocess exits with 1."""
        from fastapi import HTTPException

        try:
            return super().train(request)
        except MONAILabelException as e:
            if not getattr(self, "_server_mode", False):
                logger.error(f"SAGAN training failed: {e.msg}")
                raise SystemExit(1) from None
            raise HTTPException(status_code=422, detail=f"{e.error.value}: {e.msg}") from e
