"""Which drafted tokens the target accepts: one pure function for greedy decoding and for sampling.

Terminology (per row, per step):
    node tokens: for every tree node, the token the target emits after it — the argmax of its processed
        logits when greedy; when sampling, the token drawn from its processed distribution by inverse CDF with
        the uniform of the output position the node's child would fill (one uniform per output position).
    accepted path: the root, then, while some child of the current node carries the current node's token,
        that child.
    bonus token: the node token of the last accepted node; every step emits the accepted drafted tokens and
        the bonus, so a step never gains less than plain decoding.

Why this is lossless (ANCHORS.md, detail 3): every token emitted is the target's choice after exactly the
prefix it follows, drawn with the uniform of its output position — the token plain decoding draws there with
the same uniforms. Greedy output is therefore plain greedy output, and sampled output is plain sampled output
for the same seed, whatever was drafted (up to floating point: tree and plain forwards differ in the last bits
of the logits). Sibling tokens are distinct (``DraftTree`` guarantees it), so the walk is unambiguous.
"""

from __future__ import annotations

import numpy as np

from .compiled import array, i32, i64, kernel, returns, view
from .tree import DraftTree


def accept(tree: DraftTree, node_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The accepted path of ``tree`` and the tokens it emits.

    Args:
        tree: the verified tree.
        node_tokens: (n,) the target's token after every node (see the module docstring).

    Returns:
        accepted_nodes: (m,) int32 node indices of the accepted path, root first.
        new_tokens: (m,) int32 the accepted drafted tokens followed by the bonus token.

    >>> from .tree import Source
    >>> t = DraftTree.from_paths(7, [np.array([1, 2]), np.array([3])], [np.array([.5, .4]), np.array([.3])],
    ...                          Source.PROMPT)
    >>> [a.tolist() for a in accept(t, np.array([1, 9, 5, 5]))]
    [[0, 1], [1, 9]]
    """
    return _accept(tree.parents, tree.tokens, np.asarray(node_tokens, dtype=np.int64))


@kernel(returns(array(i32), array(i32)), view(i32), view(i32), view(i64))
def _accept(parents, tokens, node_tokens):
    """:func:`accept`: from the root, the child carrying its node token (siblings are distinct: at most one; children
    come after their parent), until none does."""
    path = np.empty(len(tokens), dtype=np.int32)
    path[0], size, node = 0, 1, 0
    while True:
        following = -1
        for child in range(node + 1, len(tokens)):
            if parents[child] == node and tokens[child] == node_tokens[node]:
                following = child
                break
        if following < 0:
            break
        path[size], size, node = following, size + 1, following
    new_tokens = np.empty(size, dtype=np.int32)
    for i in range(1, size):
        new_tokens[i - 1] = tokens[path[i]]
    new_tokens[size - 1] = node_tokens[node]
    return path[:size], new_tokens
