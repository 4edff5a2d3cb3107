"""A group of stage actors that work as one torch.distributed process group.

    placement group (one bundle per rank) -> one actor per bundle -> rank 0 picks an address
    -> every rank joins the process group -> every rank builds its stage

The ranks are created and torn down together: if any part fails, every actor of the group and
its placement group are released. The stage decides what the group computes; this file only
knows how to put processes on devices and connect them.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import StageActor
from cluster.runtime import ActorResources

PLACEMENT_TIMEOUT_S = float(os.environ.get("FRAMECAST_PLACEMENT_TIMEOUT", 120))
# How long a rank waits in a collective for the others. A rank that fails is noticed by the
# driver at once (it tears the group down); this bounds the wait only if the driver is gone too.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("FRAMECAST_COLLECTIVE_TIMEOUT", 900))


class ActorGroup:
    """`size` StageActors hosting `stage_class(*args, **kwargs)`, one per bundle, as one process group."""

    def __init__(
        self,
        stage_class: type,
        args: tuple,
        kwargs: dict[str, Any],
        size: int,
        rank: ActorResources,
        bundle: dict[str, float],
        strategy: str = "STRICT_PACK",
        within: PlacementGroup | None = None,
    ):
        """Each rank asks for `rank` within its `bundle`. `within`: a placement group made
        elsewhere, with a bundle per rank (a Serve replica's, from `placement_group_bundles`); it
        is the owner's to remove. Otherwise the group makes its own, placed by `strategy`, and
        removes it on `close`."""
        self.size = size
        self.actors: list[Any] = []
        self.rank_bundles: list[int] = []
        self._owns_placement = within is None
        self.placement_group = within or placement_group([dict(bundle)] * size, strategy=strategy)
        try:
            ready = self.placement_group.ready()
            if not ray.wait([ready], timeout=PLACEMENT_TIMEOUT_S)[0]:
                raise RuntimeError(
                    f"no room for {size} denoiser ranks of {bundle} each placed {strategy} within "
                    f"{PLACEMENT_TIMEOUT_S:.0f} s; the cluster has {ray.cluster_resources()}"
                )
            self.rank_bundles = self._bundles_by_node()
            rank_options = [self._actor(rank, index) for index in self.rank_bundles]
            self.actors = [options.remote(stage_class, *args, **kwargs) for options in rank_options]
            if size > 1:
                self._join_process_group()
        except BaseException:
            self.close()
            raise

    def _join_process_group(self) -> None:
        """Every rank joins one process group, which rank 0 hosts."""
        address, port = ray.get(self.actors[0].rendezvous_address.remote())
        joins = [
            actor.join_process_group.remote(address, port, i, self.size, COLLECTIVE_TIMEOUT_S)
            for i, actor in enumerate(self.actors)
        ]
        ray.get(joins, timeout=COLLECTIVE_TIMEOUT_S)

    def shrink(self, size: int) -> None:
        """Keep the first `size` ranks, as a process group of their own (each leaves the old one,
        and its stage with it: `rebuild` next); the others are killed. The placement group keeps
        their bundles until `close`. Cheaper than a new group where the ranks' processes stay."""
        for actor in self.actors[size:]:
            ray.kill(actor)
        self.actors, self.rank_bundles, self.size = self.actors[:size], self.rank_bundles[:size], size
        self._join_process_group()

    def _bundles_by_node(self) -> list[int]:
        """Bundle indices in rank order: node by node, so that consecutive ranks share a node.

        Ray does not promise that a PACK group puts consecutive bundles on one node; the ranks of
        a Ulysses group, which exchange the most, are consecutive and should.
        """
        nodes = placement_group_table(self.placement_group)["bundles_to_node_id"]
        first_bundle_on = {}
        for bundle in sorted(nodes):
            first_bundle_on.setdefault(nodes[bundle], bundle)
        return sorted(nodes, key=lambda bundle: (first_bundle_on[nodes[bundle]], bundle))

    def _actor(self, resources: ActorResources, bundle: int | None):
        """StageActor options for `resources`, inside bundle `bundle` of the group (None: outside it)."""
        in_group = None
        if bundle is not None:
            in_group = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=bundle)
        return StageActor.options(
            num_gpus=resources.num_gpus,
            num_cpus=resources.num_cpus,
            runtime_env={"env_vars": resources.env} if resources.env else None,
            scheduling_strategy=in_group,
        )

    def side_actor(self, resources: ActorResources, stage_class: type, *args: Any, **kwargs: Any):
        """An actor for another stage: in the bundle of a rank (beside it on its GPU) if the plan says so."""
        bundle = None if resources.beside_rank is None else self.rank_bundles[resources.beside_rank]
        return self._actor(resources, bundle).remote(stage_class, *args, **kwargs)

    def start(self) -> list[ray.ObjectRef]:
        """Build every rank's stage (collectively: the stage may create process subgroups)."""
        return [actor.start.remote() for actor in self.actors]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.placement_group is not None and self._owns_placement:
            remove_placement_group(self.placement_group)
        self.placement_group = None
