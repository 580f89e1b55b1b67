"""A registry of policies by name, as timm registers models: ``register_policy`` adds a name,
``create_policy`` builds one and rejects any option the policy does not take."""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Dict, List, Optional, Union

from ..errors import ConfigurationError
from .base import Policy

__all__ = ["register_policy", "create_policy", "list_policies", "policy_options", "POLICIES"]

#: Registered policies: name -> the policy class, or ``"module:Class"`` imported on first use.
POLICIES: Dict[str, Union[type, str]] = {}


def register_policy(name: str, cls: Optional[Union[type, str]] = None):
    """Register a policy class under ``name`` (``method=name`` then builds it). Use as a decorator
    (``@register_policy("mine")``) or call with the class (or a lazy ``"package.module:Class"``)."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"a policy name must be a non-empty string, got {name!r}", "pass a name like 'mine'")

    def add(c):
        if not isinstance(c, str) and not (isinstance(c, type) and issubclass(c, Policy)):
            raise ConfigurationError(f"register_policy({name!r}) needs a Policy subclass, got {c!r}",
                                     "subclass augplug.Policy")
        POLICIES[name] = c
        return c

    return add if cls is None else add(cls)


def _policy_class(name: str) -> type:
    if name not in POLICIES:
        raise ConfigurationError(f"unknown method {name!r}", f"use one of {list_policies()} or a Policy instance "
                                 "(register your own with augplug.methods.register_policy)")
    cls = POLICIES[name]
    if isinstance(cls, str):
        module, attr = cls.split(":")
        cls = POLICIES[name] = getattr(importlib.import_module(module), attr)
    return cls


def list_policies() -> List[str]:
    """The registered policy names, sorted."""
    return sorted(POLICIES)


def policy_options(name: str) -> List[str]:
    """The keyword options the policy registered as ``name`` takes."""
    params = inspect.signature(_policy_class(name)).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def create_policy(name: str, **options: Any) -> Policy:
    """The policy registered as ``name``, built with ``options``. An option it does not take is a
    :class:`~augplug.errors.ConfigurationError` naming the options it does take."""
    cls = _policy_class(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError:
        known = policy_options(name)
        unused = [k for k in options if k not in known]
        params = inspect.signature(cls).parameters.values()
        missing = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                   and p.default is p.empty and p.name not in options]
        raise ConfigurationError(
            f"method {name!r} does not use the option(s) {unused}" if unused else
            f"method {name!r} needs the option(s) {missing}, which were not given",
            (f"leave them out: {name!r} takes only {known}" if unused else
             f"pass them in method_options; its options are {known}")) from None
    return cls(**options)



