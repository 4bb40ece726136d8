"""Balancing methods; importing this package registers every method."""
from . import (  # noqa: F401  (imported for their @register side effect)
    cagrad,
    cograd,
    dbmtl,
    drgrad,
    equal,
    gradvac,
    graddrop,
    imtl_g,
    mgda,
    multibalance,
    nashmtl,
    pcgrad,
    static,
    uncertainty,
)
