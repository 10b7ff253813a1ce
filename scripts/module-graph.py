#!/usr/bin/env python3
"""The module graph of a crate: which of its modules name which others (`crate::a::...`, `super::`
paths and `use` lists), at a chosen depth, and every import circle in it.

Usage: scripts/module-graph.py <crate src dir> [depth]   (depth 1: top-level modules; 2: one level
below, e.g. mcp/handler). Exits 1 when there is a circle.
"""
import os, re, sys

def module_of(path, src, depth):
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] in ('mod', 'lib', 'main'):
        rel = rel[:-1]
    return '/'.join(rel[:depth]) or '(root)', rel

def strip_tests(text):
    i = text.find('#[cfg(test)]\nmod tests')
    return text if i < 0 else text[:i]

def names(text):
    """Every crate path named: `crate::a::b`, and `use crate::{a::x, b::{..}}` lists."""
    text = re.sub(r'//[^\n]*', '', text)
    found = set()
    for m in re.finditer(r'crate::([a-z_][a-z0-9_]*)(?:::([a-z_][a-z0-9_]*))?', text):
        found.add((m.group(1), m.group(2)))
    for m in re.finditer(r'crate::[A-Z]', text):
        found.add(('(root)', None))
    for m in re.finditer(r'use crate::\{', text):
        depth, i, start = 1, m.end(), m.end()
        while depth and i < len(text):
            depth += {'{': 1, '}': -1}.get(text[i], 0)
            i += 1
        body = text[start:i - 1]
        # top-level items of the list, with their first nested segment
        level, item = 0, ''
        for ch in body + ',':
            if ch == ',' and level == 0:
                item = item.strip()
                if item:
                    head = re.match(r'([a-z_][a-z0-9_]*)(?:::(?:\{\s*)?([a-z_][a-z0-9_]*))?', item)
                    if head:
                        found.add((head.group(1), head.group(2)))
                item = ''
                continue
            level += {'{': 1, '}': -1}.get(ch, 0)
            item += ch
    return found

def main():
    src = sys.argv[1]
    depth = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    modules = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.endswith('.rs'):
                p = os.path.join(dirpath, f)
                modules[p] = module_of(p, src, depth)
    known = {m for m, _ in modules.values()}
    edges = {}
    for path, (module, rel) in modules.items():
        text = strip_tests(open(path).read())
        named = names(text)
        if module == '(root)':
            named |= {(m.group(1), None) for m in re.finditer(r'\b([a-z_][a-z0-9_]*)::', re.sub(r'//[^\n]*', '', text))}
        for first, second in named:
            target = first if depth == 1 or second is None else f'{first}/{second}'
            while target not in known and '/' in target:
                target = target.rsplit('/', 1)[0]
            if target in known and target != module and not module.startswith(target + '/') and not target.startswith(module + '/'):
                edges.setdefault(module, set()).add(target)
    for m in sorted(known):
        print(f'{m} -> {", ".join(sorted(edges.get(m, ()))) or "-"}')
    # circles: strongly connected components with more than one module
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: comps.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in sorted(known):
        if v not in index: visit(v)
    if comps:
        for c in comps:
            print('circle:', ' <-> '.join(c))
        sys.exit(1)
    print('no circle')

main()
