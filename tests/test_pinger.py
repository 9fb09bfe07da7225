"""The worker's one pinger (service/ws/pinger.py), step by step with a fake clock and fake sockets.

The real thing, against the real service, is in tests/test_broadcast.py; this pins the schedule:
every socket pinged once per interval, spread over the interval's steps, a silent one closed on
its first visit a whole interval after its ping, a socket that answered pinged again.
"""

from __future__ import annotations

from service.ws.pinger import SocketPinger


class FakeSocket:
    def __init__(self, name: str) -> None:
        self.name = name
        self.pings = 0
        self.timed_out = False
        self.open = True

    def send_ping(self) -> bool:
        if self.open:
            self.pings += 1
        return self.open

    def ping_timed_out(self) -> None:
        self.timed_out = True
        self.open = False

    def __repr__(self) -> str:
        return self.name


def test_a_round_pings_everyone_once_spread_over_the_interval() -> None:
    sockets = {FakeSocket(f"s{i}") for i in range(100)}
    now = [0.0]
    pinger = SocketPinger(sockets, interval=5.0, step=1.0, clock=lambda: now[0])
    assert pinger.steps == 5
    per_step = []
    for _ in range(5):
        before = sum(s.pings for s in sockets)
        pinger._visit()
        per_step.append(sum(s.pings for s in sockets) - before)
        for socket in sockets:  # every pong comes back at once
            pinger.answered(socket)
        now[0] += 1.0
    assert all(s.pings == 1 for s in sockets)  # once each, in one round
    assert max(per_step) < 50, per_step  # spread, not one burst
    newcomer = FakeSocket("late")
    sockets.add(newcomer)  # joins mid-life: pinged within the next round, like everyone
    for _ in range(5):
        pinger._visit()
        for socket in sockets:
            pinger.answered(socket)
        now[0] += 1.0
    assert newcomer.pings == 1 and all(s.pings == 2 for s in sockets - {newcomer})


def test_a_silent_socket_is_closed_an_interval_after_its_ping_and_an_answering_one_is_pinged_again() -> None:
    silent, answering = FakeSocket("silent"), FakeSocket("answering")
    sockets = {silent, answering}
    now = [0.0]
    pinger = SocketPinger(sockets, interval=2.0, step=1.0, clock=lambda: now[0])
    for step in range(6):  # three rounds; the answering socket's pong comes back at once
        pinger._visit()
        pinger.answered(answering)
        now[0] += 1.0
        if step == 1:
            assert silent.pings == answering.pings == 1  # round 1: both pinged once
    assert silent.timed_out and silent.pings == 1
    assert not answering.timed_out and answering.pings == 3


def test_a_closed_socket_is_forgotten_and_a_failed_ping_is_not_waited_for() -> None:
    gone = FakeSocket("gone")
    gone.open = False
    sockets = {gone}
    pinger = SocketPinger(sockets, interval=1.0, step=1.0, clock=lambda: 0.0)
    pinger._visit()
    assert not pinger._waiting
    alive = FakeSocket("alive")
    sockets.add(alive)
    pinger._visit()
    assert alive in pinger._waiting
    pinger.forget(alive)
    assert not pinger._waiting
