"""Write a copy of a GGUF model with every tensor dequantized to F32 (gguf-py's dequantize).

llama.cpp multiplies quantized weights by activations quantized to 8 bits; on the F32 copy
it multiplies exact dequantized weights by f32 activations, as ape does. Evaluating both
tells llama.cpp's own activation-quantization error apart from any error of ape's.

Usage: python3 dequantize_to_f32.py IN.gguf OUT.gguf
"""
import struct, sys, numpy as np
from gguf import GGUFReader
src, dst = sys.argv[1], sys.argv[2]
data = open(src,'rb').read()
pos = 0
def take(n):
    global pos; b = data[pos:pos+n]; pos += n; return b
def u32(): return struct.unpack('<I', take(4))[0]
def u64(): return struct.unpack('<Q', take(8))[0]
def skip_val(t):
    if t in (0,1,7): take(1)
    elif t in (2,3): take(2)
    elif t in (4,5,6): take(4)
    elif t in (10,11,12): take(8)
    elif t == 8: take(u64())
    elif t == 9:
        it = u32(); n = u64()
        for _ in range(n): skip_val(it)
assert take(4) == b'GGUF'; ver = u32(); nt = u64(); nkv = u64()
for _ in range(nkv):
    take(u64()); skip_val(u32())
kv_end = pos
r = GGUFReader(src)
out = bytearray(data[:kv_end])
infos = bytearray(); blobs = []; off = 0
for t in r.tensors:
    arr = np.asarray(t.data)
    from gguf.quants import dequantize
    vals = dequantize(arr, t.tensor_type).astype(np.float32).reshape(-1)
    name = t.name.encode()
    infos += struct.pack('<Q', len(name)) + name + struct.pack('<I', len(t.shape))
    for d in t.shape: infos += struct.pack('<Q', int(d))
    infos += struct.pack('<I', 0) + struct.pack('<Q', off)
    b = vals.tobytes(); pad = (-len(b)) % 32
    blobs.append(b + b'\0'*pad); off += len(b) + pad
out += infos
out += b'\0' * ((-len(out)) % 32)
for b in blobs: out += b
open(dst,'wb').write(out)
print('wrote', dst, len(out))
