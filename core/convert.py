"""One cattrs converter for every user-facing structure: unknown keys are errors, and
errors name the key and where it was."""

from __future__ import annotations

from typing import Any, TypeVar

import cattrs

from .errors import ConfigError, MoerunError

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=True)


def structure(data: Any, cls: type[T], *, where: str = "") -> T:
    """Structure `data` into `cls`; raise ConfigError with one line per problem."""
    try:
        return converter.structure(data, cls)
    except MoerunError:
        raise
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            # a validator's own ConfigError is the clearest message: surface it
            for leaf in _leaves(exc):
                if isinstance(leaf, MoerunError):
                    raise leaf from None
            msgs = cattrs.transform_error(exc, path=where or cls.__name__)
        else:
            msgs = [str(exc)]
        raise ConfigError("; ".join(msgs)) from None


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)
