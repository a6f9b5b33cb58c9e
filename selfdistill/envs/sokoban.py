"""A small text Sokoban (the benchmark family of Skill-SD's multi-turn results, METHODS.md §5).

Boards are generated from a seed: walls around the edge, a few interior walls, targets, boxes and the player
placed at random, kept only when a breadth-first search over (player, boxes) states finds a solution of
``min_moves`` to ``max_moves`` moves. One action per turn, ``up``/``down``/``left``/``right`` (the first such word
in the reply); a reply without one is answered with the list of actions. Reward 1.0 when every box is on a
target within ``max_turns`` actions, else 0.0.

Symbols: ``#`` wall, ``_`` floor, ``O`` target, ``X`` box, ``√`` box on a target, ``P`` player,
``S`` player on a target.
"""

from __future__ import annotations

import random
import re
from collections import deque
from typing import Any

from selfdistill.envs.base import Environment, StepResult, split_seed

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
LEGEND = "# wall, _ floor, O target, X box, √ box on a target, P you, S you on a target"
PROMPT = (
    "You are playing Sokoban. Push every box (X) onto a target (O). You can push a box but not pull it, and you "
    "cannot walk through walls (#) or push two boxes at once. Symbols: {legend}. Each turn, reply with one move: "
    "up, down, left or right. You have {turns} moves."
)
_ACTION = re.compile(r"\b(up|down|left|right)\b", re.IGNORECASE)

Pos = tuple[int, int]


class Level:
    """Walls, targets, boxes and the player of one board."""

    def __init__(self, size: int, walls: set[Pos], targets: set[Pos], boxes: set[Pos], player: Pos):
        self.size, self.walls, self.targets, self.boxes, self.player = size, walls, targets, boxes, player

    def render(self) -> str:
        rows = []
        for r in range(self.size):
            line = []
            for c in range(self.size):
                p = (r, c)
                if p in self.walls:
                    line.append("#")
                elif p == self.player:
                    line.append("S" if p in self.targets else "P")
                elif p in self.boxes:
                    line.append("√" if p in self.targets else "X")
                else:
                    line.append("O" if p in self.targets else "_")
            rows.append("".join(line))
        return "\n".join(rows)


def _push(walls: set[Pos], boxes: frozenset[Pos], player: Pos, move: str) -> tuple[Pos, frozenset[Pos]] | None:
    """The state after ``move``, or None when a wall or a second box blocks it."""
    dr, dc = MOVES[move]
    nxt = (player[0] + dr, player[1] + dc)
    if nxt in walls:
        return None
    if nxt in boxes:
        beyond = (nxt[0] + dr, nxt[1] + dc)
        if beyond in walls or beyond in boxes:
            return None
        return nxt, (boxes - {nxt}) | {beyond}
    return nxt, boxes


def solve(level: Level, limit: int = 64) -> list[str] | None:
    """A shortest solution (list of moves) by breadth-first search, or None within ``limit`` moves."""
    start = (level.player, frozenset(level.boxes))
    targets = frozenset(level.targets)
    parent: dict[Any, Any] = {start: None}
    queue = deque([(start, 0)])
    while queue:
        state, depth = queue.popleft()
        if state[1] <= targets:
            path = []
            while parent[state] is not None:
                state, move = parent[state]
                path.append(move)
            return path[::-1]
        if depth >= limit:
            continue
        for move in MOVES:
            nxt = _push(level.walls, state[1], state[0], move)
            if nxt is not None and nxt not in parent:
                parent[nxt] = (state, move)
                queue.append((nxt, depth + 1))
    return None


def generate_level(seed: int, size: int = 6, boxes: int = 1, interior_walls: int = 2, min_moves: int = 2,
                   max_moves: int = 8, attempts: int = 2000) -> Level:
    """A solvable board, deterministic in ``seed``."""
    if size < 5:
        raise ValueError(f"sokoban size={size} is too small: boards need at least 3x3 interior cells (size >= 5)")
    rng = random.Random(seed)
    edge = {(r, c) for r in range(size) for c in range(size) if r in (0, size - 1) or c in (0, size - 1)}
    interior = [(r, c) for r in range(1, size - 1) for c in range(1, size - 1)]
    for _ in range(attempts):
        cells = interior[:]
        rng.shuffle(cells)
        walls = set(edge) | set(cells[: rng.randint(0, interior_walls)])
        free = [p for p in cells if p not in walls]
        if len(free) < 2 * boxes + 1:
            continue
        targets, box_cells, player = set(free[:boxes]), set(free[boxes : 2 * boxes]), free[2 * boxes]
        level = Level(size, walls, targets, box_cells, player)
        path = solve(level, limit=max_moves)
        if path is not None and min_moves <= len(path) <= max_moves:
            return level
    raise ValueError(
        f"no solvable sokoban board with {min_moves}-{max_moves} moves found in {attempts} attempts for size={size}, "
        f"boxes={boxes}; raise max_moves or size"
    )


class Sokoban(Environment):
    """Args: size: board side including the outer walls; boxes; interior_walls: at most this many extra walls;
    min_moves / max_moves: the range of the shortest solution's length; max_turns: actions allowed."""

    name = "sokoban"

    def __init__(self, size: int = 6, boxes: int = 1, interior_walls: int = 2, min_moves: int = 2,
                 max_moves: int = 8, max_turns: int = 10):
        if max_turns < 1:
            raise ValueError(f"max_turns={max_turns} must be >= 1")
        if size < 5:
            raise ValueError(f"sokoban size={size} is too small: boards need at least 3x3 interior cells (size >= 5)")
        if boxes < 1 or not 1 <= min_moves <= max_moves:
            raise ValueError(f"sokoban needs boxes >= 1 and 1 <= min_moves <= max_moves (got boxes={boxes}, "
                             f"min_moves={min_moves}, max_moves={max_moves})")
        self.size, self.boxes, self.interior_walls = size, boxes, interior_walls
        self.min_moves, self.max_moves, self.max_turns = min_moves, max_moves, max_turns
        self.level: Level | None = None
        self.turns = 0

    def reset(self, seed: int = 0, **_: Any) -> str:
        self.level = generate_level(seed, self.size, self.boxes, self.interior_walls, self.min_moves, self.max_moves)
        self.turns = 0
        return f"The board:\n{self.level.render()}"

    @property
    def solved(self) -> bool:
        return self.level is not None and self.level.boxes <= self.level.targets

    def step(self, action: str) -> StepResult:
        if self.level is None:
            raise RuntimeError("call reset() before step()")
        if self.solved or self.turns >= self.max_turns:
            raise RuntimeError("the episode is over; call reset() to start a new one")
        self.turns += 1
        match = _ACTION.search(action)
        valid = match is not None
        if not valid:
            text = "That is not a move. Reply with one of: up, down, left, right."
        else:
            move = match.group(1).lower()
            nxt = _push(self.level.walls, frozenset(self.level.boxes), self.level.player, move)
            if nxt is None:
                text = f"You cannot move {move}: something blocks the way."
            else:
                self.level.player, self.level.boxes = nxt[0], set(nxt[1])
                text = f"You moved {move}."
        if self.solved:
            return StepResult(f"{text} Every box is on a target. You solved it!", 1.0, True, valid)
        board = self.level.render()
        left = self.max_turns - self.turns
        if left <= 0:
            return StepResult(f"{text}\n{board}\nNo moves left.", 0.0, True, valid)
        return StepResult(f"{text}\n{board}\n{left} move{'s' if left > 1 else ''} left.", 0.0, False, valid)

    @classmethod
    def make_rows(cls, n: int, seed: int, split: str, size: int = 6, boxes: int = 1, max_turns: int = 10,
                  **_: Any) -> list[dict[str, Any]]:
        rng = random.Random(split_seed(seed, split))
        text = PROMPT.format(legend=LEGEND, turns=max_turns)
        # Train and test boards come from disjoint seed ranges.
        offset = {"train": 0, "test": 1 << 30}.get(split, 1 << 31)
        return [{"prompt": [{"role": "user", "content": text}], "seed": offset + rng.randrange(1 << 29),
                 "task": f"sokoban_{size}x{size}_{boxes}box"} for _ in range(n)]
