"""Mixed load against a running system, with a model of what it must end up as.

Used by the fault suite (``tests/fault``) and the soak benchmark (``bench/soak.py``). A
:class:`Load` drives the real processes over their public interfaces only: gRPC for
``BatchGetLowestPrice``, ``CheckDiscountStrict`` and admin upserts, the relation-event stream
(``XADD``, exactly what an upstream producer does) for follow / unfollow / purchase events.

While it runs it checks every answer against what it knows, and records a
:class:`Violation` for each answer that breaks a promise:

* ``BatchGetLowestPrice`` answers every call within its deadline (``degraded`` allowed), never
  discounts a buyer who never followed, and never shows a stable fan the list price unless the
  answer says ``degraded``;
* ``CheckDiscountStrict`` never answers ``ELIGIBLE`` for a buyer whose unfollow was
  acknowledged by the stream more than ``strict_max_lag_ms`` before the call, never answers
  ``NOT_IN_CROWD`` for a fan whose unfollow was not even attempted, and refuses only with
  ``UNAVAILABLE`` (or runs out of its deadline);
* admin upserts fail, if at all, with ``UNAVAILABLE`` / ``DEADLINE_EXCEEDED``.

Events go to the buyer's partition (``partitions``, as ``PRICING_EVENT_PARTITIONS``), and on
a Redis Cluster (a ``redis[s]+cluster://`` URL) the producer may wait until a replica has
every batch (``producer_wait_replicas``, ``WAIT``) before it counts the events as
acknowledged, as a durable producer does: a master killed before replicating then cannot
lose an event the model already holds.

After the load stops, :meth:`Load.settle` waits for the sync worker to apply everything and
:meth:`Load.check_final_state` compares Redis with the :class:`MembershipModel` (every fact,
exactly: follow state, version, start and expiry, last writer wins by the time of the fact;
purchases by maxima), the stream's
pending list, the dead letters, and every acknowledged rule write with the rule store.

The package: :mod:`.model` (the constants of the load's world, the :class:`MembershipModel`
and the records of what happened), :mod:`.driver` (:class:`Load`: set-up and the load loops)
and :mod:`.checks` (what :class:`Load` checks after the load).
"""

from pricing_testing.load.driver import Load
from pricing_testing.load.model import (
    ADMIN_TOKEN,
    CURRENCY,
    DEFAULT_TTLS,
    FAN_PRICE,
    ITEM,
    LIST_PRICE,
    PUBLISH_ERRORS,
    SELLER,
    STREAM_SELLERS,
    AckedRule,
    Call,
    LoadConfig,
    MembershipModel,
    Population,
    Violation,
    code_name,
    money,
    now_ms,
)

__all__ = [
    "ADMIN_TOKEN",
    "CURRENCY",
    "DEFAULT_TTLS",
    "FAN_PRICE",
    "ITEM",
    "LIST_PRICE",
    "PUBLISH_ERRORS",
    "SELLER",
    "STREAM_SELLERS",
    "AckedRule",
    "Call",
    "Load",
    "LoadConfig",
    "MembershipModel",
    "Population",
    "Violation",
    "code_name",
    "money",
    "now_ms",
]
