"""Prints the README's recompute tables (RAG tasks, then ICL tasks by number of
demonstrations) from what scripts/eval-recompute.sh writes, and draws
accuracy (as a share of sequential's) against time to first token over 8K stored context
tokens, one line per model and task, one point per recompute share:
python3 scripts/recompute-tables.py [RESULTS_DIR [MORE_DIR ...]]  (writes
RESULTS_DIR/recompute.svg). Reports in MORE_DIRs (other settings of the same test
questions, read by other runs) are joined onto RESULTS_DIR's, question by question; the
first directory that read a setting gives its outcomes, and the first that holds a
model's `ape bench ttft` table or an in-context-learning report gives it. `DIR@SETTING`
takes that one setting of DIR's reports and nothing else (`@sequential`: another build's
sequential answers to questions the runs before read only in other settings)."""
import glob, json, math, os, re, sys

ONLY = dict(arg.partition('@')[::2] for arg in sys.argv[1:] or ['eval-results/recompute'])
DIRS = list(ONLY)
D = DIRS[0]
MODELS = {
    'smollm2-135m-instruct-q4_1': 'SmolLM2-135M',
    'qwen2.5-coder-0.5b-instruct-q4_k_m': 'Qwen2.5-Coder-0.5B',
    'qwen2.5-coder-1.5b-instruct-q4_k_m': 'Qwen2.5-Coder-1.5B',
}
METRIC = {'f1': 'F1', 'contains': 'contains'}


def share(setting):
    found = re.search(r' r=([0-9.]+)', setting)
    return float(found.group(1)) if found else 0.0


def first_in_dirs(name):
    """The path of `name` in the first of the directories that holds it, or None."""
    return next((f'{d}/{name}' for d in DIRS if not ONLY[d] and os.path.exists(f'{d}/{name}')),
                None)


def ttft_by_share(model):
    """Sequential's time and APE's at each share, from `ape bench ttft`'s table."""
    path = first_in_dirs(f'ttft-{model}.md')
    if path is None:
        return None, {}
    with open(path) as f:
        lines = [l for l in f if l.startswith('|')]
    head = [c.strip() for c in lines[0].strip('|\n').split('|')]
    row = [c.strip() for c in lines[2].strip('|\n').split('|')]
    times = {}
    for name, cell in zip(head, row):
        found = re.match(r'in memory, r = ([0-9.]+)', name)
        if found and cell != 'beyond the window':
            times[float(found.group(1))] = float(cell)
    sequential = None if row[2] == 'beyond the window' else float(row[2])
    return sequential, times


def paired_difference(run, metric, setting):
    """Mean of the per-question difference from sequential, and its standard error: the
    same questions answered both ways, so question-to-question spread cancels."""
    diffs = []
    for example in run['examples']:
        by = {o['setting']: o for o in example['outcomes']}
        if setting in by and 'sequential' in by:
            ours, theirs = by[setting].get(metric), by['sequential'].get(metric)
            if ours is not None and theirs is not None:
                diffs.append(ours - theirs)
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return 100 * mean, 100 * sd / math.sqrt(n)


def mean_and_error(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd / math.sqrt(n)


def merged_run(model, task):
    """The test run of `model` on `task`, with its parts run later with `ape eval --skip K`
    (files ending in -fromK.json) and the runs in the other directories joined on: a
    question read in several parts is one example with every setting it was read in (the
    first part's outcome where two read it in the same setting), and every setting is
    summarised over the questions that have it."""
    paths = []
    for d in DIRS:
        first = f'{d}/{task}-{model}-test.json'
        if os.path.exists(first):
            paths.append((d, first))
            paths += [(d, p) for p in sorted(
                glob.glob(f'{d}/{task}-{model}-test-from*.json'),
                key=lambda p: int(re.search(r'-from([0-9]+)\.json$', p).group(1)))]
    if not paths:
        return None, None
    reports = []
    for d, path in paths:
        with open(path) as f:
            report = json.load(f)
        if ONLY[d]:
            report['settings'] = [s for s in report['settings'] if s == ONLY[d]]
            for e in report['runs'][0]['examples']:
                e['outcomes'] = [o for o in e['outcomes'] if o['setting'] == ONLY[d]]
        reports.append(report)
    settings = []
    for report in reports:
        settings += [s for s in report['settings'] if s not in settings]
    examples, differing = {}, set()
    for report in reports:
        for e in report['runs'][0]['examples']:
            joined = examples.setdefault((e['id'], e['question']), dict(e, outcomes=[]))
            read = {o['setting']: o for o in joined['outcomes']}
            joined['outcomes'] += [o for o in e['outcomes'] if o['setting'] not in read]
            # Every run's KL is from its own sequential reading: joining runs is sound only
            # where they read the question sequentially alike.
            ours, theirs = read.get('sequential'), next(
                (o for o in e['outcomes'] if o['setting'] == 'sequential'), None)
            if ours and theirs and ours['prediction'] != theirs['prediction']:
                differing.add(e['id'])
    if differing:
        print(f'warning: {len(differing)} {task} questions of {model} were answered differently '
              'by sequential reading in the runs joined', file=sys.stderr)
    examples = list(examples.values())
    settings.sort(key=lambda s: (s != 'sequential', s != 'parallel', share(s)))
    return reports[0], {'contexts': reports[0]['runs'][0]['contexts'], 'settings': settings,
                        'examples': examples}


def by_document(run, metric):
    """Each setting's metric by the context that holds the answer (SQuAD notes it as
    `gold document K`), with its paired difference from sequential's over those questions."""
    groups = {}
    for e in run['examples']:
        found = re.fullmatch(r'gold document ([0-9]+)', e.get('note') or '')
        if found:
            groups.setdefault(int(found.group(1)), []).append(e)
    if not groups:
        return
    documents = sorted(groups)
    print('\nBy the context holding the answer (first is 1): ' + METRIC[metric]
          + ', − sequential (paired s.e.), questions\n')
    print('| setting | ' + ' | '.join(str(k + 1) for k in documents) + ' |')
    print('|---|' + '---:|' * len(documents))
    for setting in run['settings']:
        cells = []
        for k in documents:
            values = [o[metric] for e in groups[k] for o in e['outcomes']
                      if o['setting'] == setting and o[metric] is not None]
            paired = paired_difference({'examples': groups[k]}, metric, setting)
            cell = f'{100 * sum(values) / len(values):.1f}' if values else '–'
            if setting != 'sequential' and paired is not None:
                cell += f' ({paired[0]:+.1f} ({paired[1]:.1f}))'
            cells.append(f'{cell}, {len(values)}')
        print(f'| {setting} | ' + ' | '.join(cells) + ' |')


curves = []
for model, name in MODELS.items():
    sequential_time, times = ttft_by_share(model)
    for task in ['squad', 'needle']:
        report, run = merged_run(model, task)
        if report is None:
            continue
        metric = report['metric']
        counts = {len([e for e in run['examples'] if any(o['setting'] == s for o in e['outcomes'])])
                  for s in run['settings']}
        print(f"\n{name}, {task} ({'/'.join(str(c) for c in sorted(counts, reverse=True))} test questions, "
              f"{run['contexts']} contexts, {METRIC[metric]})\n")
        print('| setting | questions | metric | ± s.e. | − sequential (paired s.e.) | ÷ sequential | KL from sequential | TTFT at 8K (s) | TTFT ÷ sequential |')
        print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
        points = []
        for setting in run['settings']:
            outcomes = [o for e in run['examples'] for o in e['outcomes']
                        if o['setting'] == setting and o[metric] is not None]
            value, error = mean_and_error([o[metric] for o in outcomes])
            kl = sum(o['kl_vs_sequential'] for o in outcomes) / len(outcomes)
            r = share(setting)
            is_ape = setting.startswith('ape')
            t = times.get(r) if is_ape else (sequential_time if setting == 'sequential' else None)
            speed = f'1/{sequential_time / t:.1f}' if t and sequential_time else '–'
            paired = paired_difference(run, metric, setting)
            versus = '–' if setting == 'sequential' or paired is None else f'{paired[0]:+.1f} ({paired[1]:.1f})'
            # Over the same questions, as the parts need not all hold every setting.
            same = [o for e in run['examples'] for o in e['outcomes']
                    if o['setting'] == 'sequential' and o[metric] is not None
                    and any(x['setting'] == setting for x in e['outcomes'])]
            sequential_mean = sum(o[metric] for o in same) / len(same) if same else None
            ratio = value / sequential_mean if sequential_mean else None
            print(f"| {setting} | {len(outcomes)} | {100 * value:.1f} | {100 * error:.1f} | {versus} | "
                  f"{'–' if ratio is None else f'{100 * ratio:.0f}%'} | {kl:.3f} | "
                  f"{'–' if t is None else f'{t:.2f}'} | {speed} |")
            if is_ape and t is not None and ratio is not None:
                points.append((t, 100 * ratio, r))
        if points:
            curves.append((f'{name}, {task}', sorted(points)))
        by_document(run, metric)

# ICL: one run per number of demonstrations; each cell is the setting's accuracy, its ratio
# to sequential's over the same questions and the paired difference's standard error.
for model, name in MODELS.items():
    for task in ['intent', 'sentiment']:
        path = first_in_dirs(f'{task}-{model}-test.json')
        if path is None:
            continue
        with open(path) as f:
            report = json.load(f)
        runs = report['runs']
        questions = len(runs[0]['examples'])
        print(f"\n{name}, {task} ({questions} test questions per cell, accuracy; ÷ sequential;"
              f" − sequential in points with its paired s.e.; KL from sequential)\n")
        print('| setting | ' + ' | '.join(f"{run['contexts']} demonstrations" for run in runs) + ' |')
        print('|---|' + '---:|' * len(runs))
        for setting in report['settings']:
            cells = []
            for run in runs:
                summary = next(x for x in run['summaries'] if x['setting'] == setting)
                if summary['metric'] is None:
                    cells.append('beyond the window')
                    continue
                ratio = summary.get('ratio_to_sequential')
                cell = f"{100 * summary['metric']:.1f}"
                if setting != 'sequential':
                    paired = paired_difference(run, 'accuracy', setting)
                    cell += f" ({'–' if ratio is None else f'{100 * ratio:.0f}%'}"
                    cell += '' if paired is None else f"; {paired[0]:+.1f} ± {paired[1]:.1f}"
                    kl = summary['kl_vs_sequential']
                    cell += ')' if kl is None else f"; KL {kl:.3f})"
                cells.append(cell)
            print(f'| {setting} | ' + ' | '.join(cells) + ' |')

if curves:
    W, H, L, B = 640, 400, 60, 50
    xs = [p[0] for _, c in curves for p in c]
    ys = [p[1] for _, c in curves for p in c] + [100]
    x0, x1 = 0, max(xs) * 1.1
    y0, y1 = min(ys) - 5, max(ys) + 5
    X = lambda x: L + (x - x0) / (x1 - x0) * (W - L - 20)
    Y = lambda y: H - B - (y - y0) / (y1 - y0) * (H - B - 20)
    colours = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b']
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - 20}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="20" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{Y(100):.1f}" x2="{W - 20}" y2="{Y(100):.1f}" stroke="grey" stroke-dasharray="4"/>',
           f'<text x="{W - 20}" y="{Y(100) - 4:.1f}" text-anchor="end" fill="grey">sequential</text>',
           f'<text x="{(L + W) / 2}" y="{H - 12}" text-anchor="middle">time to first token over 8K stored context tokens (s)</text>',
           f'<text x="15" y="{(H - B) / 2}" transform="rotate(-90 15 {(H - B) / 2})" text-anchor="middle">accuracy ÷ sequential (%)</text>']
    for i in range(6):
        x = x0 + (x1 - x0) * i / 5
        y = y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{X(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x:.1f}</text>')
        out.append(f'<text x="{L - 6}" y="{Y(y) + 4:.1f}" text-anchor="end">{y:.0f}</text>')
    for i, (label, points) in enumerate(curves):
        c = colours[i % len(colours)]
        path = ' '.join(f'{X(t):.1f},{Y(a):.1f}' for t, a, _ in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for t, a, r in points:
            out.append(f'<circle cx="{X(t):.1f}" cy="{Y(a):.1f}" r="3" fill="{c}"/>')
            out.append(f'<text x="{X(t) + 5:.1f}" y="{Y(a) - 5:.1f}" fill="{c}" font-size="10">r={r:g}</text>')
        out.append(f'<text x="{L + 10}" y="{30 + 16 * i}" fill="{c}">{label}</text>')
    out.append('</svg>')
    with open(f'{D}/recompute.svg', 'w') as f:
        f.write('\n'.join(out) + '\n')
    print(f'\nwrote {D}/recompute.svg')
