"""`collaborators`: a class that holds what it works with states it once, as fields.

Many objects only keep the parts they are built with (a handler its store and gates,
a service its clock); written by hand, each name stands three times (parameter,
annotation, ``self.x = x``).  ``@collaborators`` makes such a class a dataclass, so
the fields are the constructor (positional or keyword, as before), with two of a
dataclass's defaults turned off because they would change what these objects are:

* ``eq=False``: equality and hashing stay by identity.  Two handlers over the same
  store are still two handlers, and each stays usable as a dictionary key.
* ``repr=False``: the repr stays ``<Gates object at …>``.  A generated one would print
  every collaborator, down to the configuration and its SMTP password, wherever an
  object is logged (Twisted logs a factory's repr when it starts).

Slots are left as they were: attribute access costs the same as before.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(eq_default=False, field_specifiers=(dataclasses.field,))
def collaborators(cls: type[T]) -> type[T]:
    """``cls`` as a dataclass whose equality is identity and whose repr is object's."""
    return dataclasses.dataclass(eq=False, repr=False)(cls)
