"""A lifecycle node base that keeps the bookkeeping out of the nodes (node plumbing of perception_node and vla_node).

A subclass implements ``configure()`` (load the model, create outputs with :meth:`keep_output`), ``activate()``
(create subscriptions and timers with :meth:`keep_input`), ``deactivate()`` (e.g. send a stop; the inputs are
destroyed after it) and ``release()`` (drop the model). The standard transitions then do the rest:

* configure: a failure returns to ``unconfigured`` with everything created so far destroyed; the exception is
  kept (:attr:`failure`) for :meth:`autostart`, which re-raises it, so ``node_main.run_node`` ends a one-step start
  with one FATAL line and exit 2 as for a plain node (the in-process bring-up raises it the same way, within
  :meth:`caller_reports_failures`);
* deactivate: ``deactivate()`` then the inputs are destroyed; cleanup, shutdown and error: everything is destroyed
  and ``release()`` runs, then the garbage is collected so a model's memory goes at once.

``lifecycle_state`` holds the label of the state (``unconfigured``, ``inactive``, ``active``, ``finalized``).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.publisher import Publisher
from rclpy.service import Service
from rclpy.subscription import Subscription
from rclpy.timer import Timer

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class ManagedNode(LifecycleNode):
    def __init__(self, node_name: str, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._inputs: list[Any] = []
        self._outputs: list[Any] = []
        self._failure: BaseException | None = None
        self._caller_reports = False
        self.lifecycle_state = "unconfigured"

    # -- for subclasses -----------------------------------------------------------------------------------------
    def configure(self) -> None: ...

    def activate(self) -> None: ...

    def deactivate(self) -> None: ...

    def release(self) -> None: ...

    def state_changed(self, label: str) -> None: ...

    def keep_input(self, entity):
        self._inputs.append(entity)
        return entity

    def drop_input(self, entity) -> None:
        """Destroys one input now (a subscription re-created with another QoS, a timer with another period)."""
        self._inputs.remove(entity)
        self._destroy([entity])

    def keep_output(self, entity):
        self._outputs.append(entity)
        return entity

    @property
    def failure(self) -> BaseException | None:
        """What made the last configure fail (None once one succeeds)."""
        return self._failure

    @contextlib.contextmanager
    def caller_reports_failures(self) -> Iterator[None]:
        """Within it a failed configure is not logged here: the caller raises :attr:`failure` (said once)."""
        previous, self._caller_reports = self._caller_reports, True
        try:
            yield
        finally:
            self._caller_reports = previous

    def autostart(self) -> None:
        """Configure and activate now; raises what made configure fail."""
        with self.caller_reports_failures():
            for trigger in (self.trigger_configure, self.trigger_activate):
                if trigger() != SUCCESS:
                    raise self._failure or RuntimeError(f"{trigger.__name__} failed")

    # -- transitions --------------------------------------------------------------------------------------------
    def on_configure(self, state) -> TransitionCallbackReturn:
        self._failure = None
        try:
            self.configure()
        except Exception as exc:  # reported by autostart's caller (one FATAL line), else here
            self._failure = exc
            if not self._caller_reports:
                self.get_logger().error(f"configure failed: {exc}")
            self._release()
            return FAILURE
        return self._set("inactive")

    def on_activate(self, state) -> TransitionCallbackReturn:
        self.activate()
        return self._set("active")

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self.deactivate()
        self._destroy(self._inputs)
        return self._set("inactive")

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._release()
        return self._set("unconfigured")

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        if self.lifecycle_state == "active":
            self.on_deactivate(state)
        self._release()
        return self._set("finalized")

    def on_error(self, state) -> TransitionCallbackReturn:
        self.on_shutdown(state)
        return self._set("unconfigured")

    # -- internals ----------------------------------------------------------------------------------------------
    def _set(self, label: str) -> TransitionCallbackReturn:
        self.lifecycle_state = label
        self.state_changed(label)
        return SUCCESS

    def _release(self) -> None:
        self._destroy(self._inputs)
        self._destroy(self._outputs)
        self.release()
        gc.collect()

    def _destroy(self, entities: list[Any]) -> None:
        for entity in entities:
            if isinstance(entity, Timer):
                self.destroy_timer(entity)
            elif isinstance(entity, Subscription):
                self.destroy_subscription(entity)
            elif isinstance(entity, Publisher):
                self.destroy_publisher(entity)
            elif isinstance(entity, Service):
                self.destroy_service(entity)
        entities.clear()
