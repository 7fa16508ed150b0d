"""The served model: the base as the main process resolved it, the names that mean it, and how an
OpenAI ``model`` value resolves to the base or an adapter (shared by the assembly and the routes)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from loracore import artifact
from loracore.artifact import valid_name, valid_ref
from loracore.template import DEFAULT_TEMPLATE, Template, choose_template
from service.adapters import store
from service.errors import ApiError
from service.openai_schemas import ModelCard
from service.settings import Settings

OWNER = "loraserve"


@dataclass(frozen=True)
class ServedModel:
    """The base as the main process resolved it (trainer.model.BaseSource) plus device and dtype."""

    name: str
    path: Path
    origin: str
    random_weights: bool
    device: str
    dtype: str


# --- model names -----------------------------------------------------------------------------------


BASE_ALIAS = "base"  # always names the base, whatever it is called


def base_model_id(model: ServedModel) -> str:
    """The base's own name: a hub id as given, a local folder by its folder name."""
    local = Path(model.name).expanduser()
    return local.name if local.is_dir() and local.name else model.name


def base_names(settings: Settings, model: ServedModel) -> tuple[str, frozenset[str]]:
    """(the id /v1/models lists, every ``model`` value that means the base).

    As in vLLM, the first ``--served-model-name`` is the listed id and every one of them is
    accepted; the base's own name, the ``--model`` value and ``base`` are accepted as well.
    """
    own = base_model_id(model)
    served = settings.served_model_names
    return (served[0] if served else own), frozenset({*served, own, model.name, BASE_ALIAS})


@dataclass(frozen=True)
class Models:
    """Maps OpenAI ``model`` names onto the base (None) or an adapter name, reading the adapter folder."""

    base_id: str
    base_names: frozenset[str]
    adapter_dir: Path
    base_created: int
    base_template: Template | None = None  # the base's own chat template, when it ships one

    def resolve(self, name: str) -> str | None:
        if name in self.base_names:
            return None
        if valid_name(name) and store.exists(self.adapter_dir, name):
            return name
        if artifact.VERSION_SEP in name and valid_name(artifact.split_ref(name)[0]):
            store.check_ref(name, "model")  # 422 for a malformed version: "name@<8+ hex digits>"
        if valid_ref(name):  # name@<version id prefix>: one version of an adapter
            try:
                store.resolve(self.adapter_dir, name, param="model")
            except ApiError as exc:
                raise model_not_found(exc) from None
            return name
        raise ApiError(
            404,
            "model_not_found",
            f"the model {name!r} does not exist: GET /v1/models lists the base ({self.base_id!r}) "
            "and every adapter",
            "model",
        )

    def cards(self) -> list[ModelCard]:
        out = [
            ModelCard(
                id=self.base_id,
                created=self.base_created,
                owned_by=OWNER,
                parent=None,
                root=self.base_id,
                template=(self.base_template or DEFAULT_TEMPLATE).to_dict(),
            )
        ]
        for name in store.names(self.adapter_dir):
            if name in self.base_names:  # the base's name wins; such an adapter is reached via /generate
                continue
            out.append(self.adapter_card(name))
        return out

    def adapter_card(self, name: str) -> ModelCard:
        """The card of an adapter, or of one of its versions (``name@<version id prefix>``)."""
        version = artifact.resolve(self.adapter_dir, name)
        folder = version.folder if version is not None else store.adapter_path(self.adapter_dir, name)
        record = artifact.read_record(folder) or artifact.Record()
        created = _timestamp(record.created)
        if created is None:
            try:
                created = int(folder.stat().st_mtime)
            except OSError:
                created = 0
        template = choose_template(self.base_template, record.template).to_dict()
        return ModelCard(
            id=name,
            created=created,
            owned_by=OWNER,
            parent=self.base_id,
            root=self.base_id,
            template=template,
        )

    def card(self, name: str) -> ModelCard:
        adapter = self.resolve(name)
        if adapter is None:
            return self.cards()[0]
        return self.adapter_card(adapter)


def _timestamp(iso: Any) -> int | None:
    if not isinstance(iso, str):
        return None
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return None


def model_not_found(exc: ApiError) -> ApiError:
    """An adapter that ``model`` named is gone: OpenAI's ``model_not_found`` (a composition's adapters
    keep ``adapter_not_found``, their param names the entry). The one place that relabels it."""
    return ApiError(exc.status, "model_not_found", exc.message, "model")
