"""Loading a study: from a TOML file or a dict, with every validation error in the one message
form (file, key, expected, got, how to fix)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ablab.errors import StudyError, short_repr
from ablab.study.schema import SECTIONS, Study, _KeyedError


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model found at ``loc`` inside Study (for 'did you mean')."""
    model: Any = Study
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _did_you_mean(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean `{close[0]}`? " if close else ""


def to_study_error(exc: ValidationError, source: str, prefix: str = "") -> StudyError:
    """The first pydantic error as one StudyError (file, key, expected, got, fix)."""
    err = exc.errors()[0]
    keyed = (err.get("ctx") or {}).get("error")
    if isinstance(keyed, _KeyedError):
        if keyed.relative:  # relative to the table that raised it: where that table is
            table = _loc(tuple(p for p in err["loc"] if not str(p).startswith("function-")))
            table = ".".join(t for t in (prefix, "" if table == "(top level)" else table) if t)
            key = f"{table}.{keyed.key}" if table else keyed.key
        else:
            nested = prefix and keyed.key != prefix and not keyed.key.startswith(f"{prefix}.")
            key = f"{prefix}.{keyed.key}" if nested else keyed.key
        return StudyError(
            where=source, key=key, expected=keyed.expected, got=keyed.got, fix=keyed.fix
        )
    loc = tuple(p for p in err["loc"] if not str(p).startswith("function-after"))
    key = _loc(loc)
    if prefix:
        key = f"{prefix}.{key}" if key != "(top level)" else prefix
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = key.rsplit(".", 1)[0] if "." in key else "(top level)"
        return StudyError(
            where=source,
            key=key,
            expected=f"only the documented keys in [{parent}]",
            got=f"unknown key {loc[-1]!r}",
            fix=_did_you_mean(str(loc[-1]), _known_keys(loc[:-1]))
            + "remove or rename it (see the README's study file reference)",
        )
    if kind == "missing":
        return StudyError(
            where=source,
            key=key,
            expected="this key to be present",
            got="nothing",
            fix=f"add `{loc[-1]} = ...`",
        )
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("Input should be "):  # pydantic's wording -> the message form's
        rest = msg.removeprefix("Input should be ")
        msg = rest if rest.startswith(("a ", "an ")) else f"a value {rest}"
    fix = "correct the value (see the README's study file reference)"
    if kind in _RANGE_ERRORS:  # "Input should be less than or equal to 1000000"
        fix = f"use {msg}"
    elif kind == "finite_number":
        fix = "give a finite number (no nan / inf)"
    elif kind in ("int_from_float", "int_parsing"):
        fix = "give a whole number, e.g. 10"
    got = short_repr(err.get("input"))
    return StudyError(where=source, key=key, expected=msg, got=got, fix=fix)


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def study_from_dict(raw: Mapping[str, Any], *, source: str = "<in code>", root: str = ".") -> Study:
    """Validate a study given as a plain dict (the TOML document's layout)."""
    raw = dict(raw)
    for key in raw:
        if key not in (*SECTIONS, "name", "description"):
            raise StudyError(
                where=source,
                key=key,
                expected=f"one of the sections {list(SECTIONS)} or `name` / `description`",
                got=f"unknown key {key!r}",
                fix="remove or rename it (see the README's study file reference)",
            )
    variants = raw.pop("variants", None)
    baseline = None
    if variants is not None:
        if not isinstance(variants, Mapping):
            raise StudyError(
                where=source,
                key="variants",
                expected="a table of named variants",
                got=short_repr(variants),
                fix='write [variants.NAME] tables and `baseline = "NAME"` under [variants]',
            )
        variants = dict(variants)
        baseline = variants.pop("baseline", None)
        for name, spec in variants.items():
            if not isinstance(spec, Mapping):
                raise StudyError(
                    where=source,
                    key=f"variants.{name}",
                    expected="a table (layers / params / train)",
                    got=short_repr(spec),
                    fix=f"write [variants.{name}] with `layers = [...]` or `params = {{...}}`",
                )
        raw["variants"] = variants
    raw["baseline"] = baseline
    for section in ("data", "train"):
        if section not in raw:
            raise StudyError(
                where=source,
                key=section,
                expected=f"a [{section}] section",
                got="nothing",
                fix=f"add a [{section}] section (see examples/bn_yes_or_no.toml)",
            )
    try:
        return Study.model_validate({**raw, "source": source, "root": root})
    except ValidationError as exc:
        raise to_study_error(exc, source) from exc


def load_study(path: str | Path) -> Study:
    """Read and validate a study TOML file; relative paths in it resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(
            where=str(path),
            key="(file)",
            expected="an existing study file (.toml)",
            got="no such file",
            fix="check the path, e.g. `ablab run examples/bn_yes_or_no.toml`",
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(
            where=str(path),
            key="(syntax)",
            expected="valid TOML",
            got=str(exc),
            fix="correct the TOML syntax at the position given",
        ) from exc
    except UnicodeDecodeError as exc:
        raise StudyError(
            where=str(path),
            key="(file)",
            expected="a UTF-8 text file",
            got="undecodable bytes",
            fix="save the study as UTF-8 TOML",
        ) from exc
    raw.setdefault("name", path.stem)
    return study_from_dict(raw, source=str(path), root=str(path.resolve().parent))
