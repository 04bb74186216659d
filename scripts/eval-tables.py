"""Prints the README's per-model accuracy and fidelity tables, and the summary set against
the paper, from the test-split reports that scripts/eval-readme.sh writes:
python3 scripts/eval-tables.py [RESULTS_DIR]."""
import json, os, sys
D = sys.argv[1] if len(sys.argv) > 1 else 'eval-results/readme'
MODELS = ['smollm2-135m-instruct-q4_1', 'qwen2.5-coder-0.5b-instruct-q4_k_m', 'gemma-3-270m-q4_k_m']
NAMES = {'smollm2-135m-instruct-q4_1': 'SmolLM2-135M', 'qwen2.5-coder-0.5b-instruct-q4_k_m': 'Qwen2.5-Coder-0.5B',
         'gemma-3-270m-q4_k_m': 'Gemma-3-270M'}
FAMILY = {'squad': 'RAG', 'needle': 'RAG', 'sentiment': 'ICL', 'intent': 'ICL'}
def pct(x): return '–' if x is None else f'{100*x:.1f}'
def rat(x): return '–' if x is None else f'{100*x:.0f}%'
def kl(x): return '–' if x is None else f'{x:.3f}'
def ll(x): return '–' if x is None else f'{x:.2f}'
def pts(a, b): return '–' if a is None or b is None else f'{100*(a-b):+.1f}'
def mean(xs): return sum(xs) / len(xs) if xs else None

summary = []
for m in MODELS:
    acc = []; fid = []
    # family -> [(sequential, parallel, ape 0.9, ape chosen)] over cells sequential could read
    cells = {'RAG': [], 'ICL': []}
    chosen_by_family = {}
    for task in ['squad', 'needle', 'sentiment', 'intent']:
        f = f'{D}/{task}-{m}-test.json'
        if not os.path.exists(f): continue
        r = json.load(open(f))
        for run in r['runs']:
            s = run['summaries']
            # sequential, parallel, ape:0.9:0.9, then the dev-chosen factors (when they differ)
            seq, par, ape9 = s[0], s[1], s[2]
            ch = s[3] if len(s) > 3 else s[2]
            chosen = ch['setting'].replace('ape ', '')
            chosen_by_family[FAMILY[task]] = chosen
            metric = {'f1': 'F1', 'contains': 'contains', 'accuracy': 'acc.'}[r['metric']]
            k = run['contexts']
            seqm = 'beyond window' if seq['metric'] is None else pct(seq['metric'])
            se = max((x['metric_stderr'] for x in s[:4] if x.get('metric_stderr') is not None), default=None)
            agree = '' if r['metric'] != 'accuracy' else ' / '.join(pct(x.get('agrees_with_sequential')) for x in (par, ape9, ch))
            acc.append(f"| {task} | {k} | {run['examples'].__len__()} | {metric} | {seqm} | {pct(par['metric'])} | {pct(ape9['metric'])} | {pct(ch['metric'])} ({chosen}) | {pct(se)} | {rat(par['ratio_to_sequential'])} | {rat(ape9['ratio_to_sequential'])} / {rat(ch['ratio_to_sequential'])} | {pts(ape9['metric'], par['metric'])} / {pts(ch['metric'], par['metric'])} | {agree} |")
            fid.append(f"| {task} | {k} | {kl(par['kl_vs_sequential'])} | {kl(ape9['kl_vs_sequential'])} | {kl(ch['kl_vs_sequential'])} | {ll(seq['gold_logprob'])} | {ll(par['gold_logprob'])} | {ll(ape9['gold_logprob'])} | {ll(ch['gold_logprob'])} |")
            if seq['metric'] is not None and task != 'needle':
                cells[FAMILY[task]].append((seq['metric'], par['metric'], ape9['metric'], ch['metric']))
    print(f"\n#### {NAMES[m]}\n")
    print("| task | contexts | questions | metric | sequential | parallel | APE 0.9/0.9 | APE dev-chosen | ± s.e. | parallel ÷ seq | APE ÷ seq (0.9 / chosen) | APE − parallel, points (0.9 / chosen) | same label as seq (par / 0.9 / chosen) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print('\n'.join(acc))
    print("\nFidelity to sequential on the gold answer's tokens: mean KL (nats) and gold log-likelihood\n")
    print("| task | contexts | KL parallel | KL APE 0.9/0.9 | KL APE chosen | log-lik sequential | parallel | APE 0.9/0.9 | APE chosen |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print('\n'.join(fid))
    for family, rows in cells.items():
        if not rows: continue
        seq, par, ape9, ch = (mean([r[i] for r in rows]) for i in range(4))
        summary.append(f"| {NAMES[m]} | {family} ({len(rows)} cell{'s' if len(rows) > 1 else ''}) | {rat(ape9/seq)} / {rat(ch/seq)} ({chosen_by_family[family]}) | {rat(par/seq)} | {pts(ape9, par)} / {pts(ch, par)} | {'98%, +3.6' if family == 'RAG' else '93%, +7.9'} |")

print("\nAgainst the paper: means over the cells sequential can read (squad for RAG; sentiment and intent at every k for ICL)\n")
print("| model | family | APE ÷ seq (0.9 / chosen) | parallel ÷ seq | APE − parallel, points (0.9 / chosen) | paper |")
print("|---|---|---|---|---|---|")
print('\n'.join(summary))
