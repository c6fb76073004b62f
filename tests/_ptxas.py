"""ptxas check shared by the kernel tests: the generated CUDA must assemble for sm_90a with no spills."""
import subprocess


def ptxas_sm90a(src: str, tmp_path, suppress: str = "177,1046") -> str:
    """nvcc-compile ``src`` to an sm_90a cubin with ``-Xptxas -v``; assert success, no spill stores and an empty
    stack frame; return ptxas' report (stderr) for kernel-specific checks."""
    cu = tmp_path / "k.cu"
    cu.write_text(src)
    r = subprocess.run(["nvcc", "--cubin", "-gencode", "arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                        "-diag-suppress", suppress, "-o", str(tmp_path / "k.cubin"), str(cu)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0 bytes spill stores" in r.stderr and "0 bytes stack frame" in r.stderr, r.stderr[-2000:]
    return r.stderr
