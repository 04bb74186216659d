"""Prints the README's per-model accuracy and fidelity tables from the test-split reports
that scripts/eval-readme.sh writes: python3 scripts/eval-tables.py [RESULTS_DIR]."""
import json, os, sys
D = sys.argv[1] if len(sys.argv) > 1 else 'eval-results/readme'
MODELS = ['smollm2-135m-instruct-q4_1', 'qwen2.5-coder-0.5b-instruct-q4_k_m']
names={'smollm2-135m-instruct-q4_1':'SmolLM2-135M','qwen2.5-coder-0.5b-instruct-q4_k_m':'Qwen2.5-Coder-0.5B'}
def pct(x): return '–' if x is None else f'{100*x:.1f}'
def rat(x): return '–' if x is None else f'{100*x:.0f}%'
def kl(x): return '–' if x is None else f'{x:.3f}'
def ll(x): return '–' if x is None else f'{x:.2f}'
def pts(a,b): return '–' if a is None or b is None else f'{100*(a-b):+.1f}'
for m in MODELS:
    acc=[]; fid=[]
    for task in ['squad','needle','sentiment','intent']:
        f=f'{D}/{task}-{m}-test.json'
        if not os.path.exists(f): continue
        r=json.load(open(f))
        for run in r['runs']:
            s=run['summaries']
            seq,par=s[0],s[1]
            ape9=s[2]
            # sequential, parallel, ape:0.9:0.9, then the dev-chosen factors (when they differ)
            ch=s[3] if len(s)>3 else s[2]
            chosen=ch['setting'].replace('ape ','')
            metric={'f1':'F1','contains':'contains','accuracy':'acc.'}[r['metric']]
            k=run['contexts']
            seqm='beyond window' if seq['metric'] is None else pct(seq['metric'])
            acc.append(f"| {task} | {k} | {metric} | {seqm} | {pct(par['metric'])} | {pct(ape9['metric'])} | {pct(ch['metric'])} ({chosen}) | {rat(par['ratio_to_sequential'])} | {rat(ape9['ratio_to_sequential'])} / {rat(ch['ratio_to_sequential'])} | {pts(ape9['metric'],par['metric'])} / {pts(ch['metric'],par['metric'])} |")
            fid.append(f"| {task} | {k} | {kl(par['kl_vs_sequential'])} | {kl(ape9['kl_vs_sequential'])} | {kl(ch['kl_vs_sequential'])} | {ll(seq['gold_logprob'])} | {ll(par['gold_logprob'])} | {ll(ape9['gold_logprob'])} | {ll(ch['gold_logprob'])} |")
    print(f"\n#### {names[m]}\n")
    print("| task | contexts | metric | sequential | parallel | APE 0.9/0.9 | APE dev-chosen | parallel ÷ seq | APE ÷ seq (0.9 / chosen) | APE − parallel, points (0.9 / chosen) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    print('\n'.join(acc))
    print("\nFidelity to sequential on the gold answer's tokens: mean KL (nats) and gold log-likelihood\n")
    print("| task | contexts | KL parallel | KL APE 0.9/0.9 | KL APE chosen | log-lik sequential | parallel | APE 0.9/0.9 | APE chosen |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print('\n'.join(fid))
