//! Finding `libonnxruntime.so` at run time (`ort` is built with `load-dynamic`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// File name of the shared library on Linux.
const LIB: &str = "libonnxruntime.so";

/// The library path, searched in this order: `ORT_DYLIB_PATH`; the project-local
/// `.ort/lib/` (next to the working directory or any ancestor of the executable);
/// an installed `onnxruntime` Python package. The error is one sentence saying how
/// to get it.
pub fn locate() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "ORT_DYLIB_PATH points to {}, which is not a file; fix it, or unset it and run scripts/setup.sh",
                p.display()
            ))
        };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    if let Some(found) = roots
        .iter()
        .map(|r| r.join(".ort/lib").join(LIB))
        .find(|p| p.is_file())
    {
        return Ok(found);
    }
    if let Some(found) = python_package() {
        return Ok(found);
    }
    Err("ONNX Runtime library not found: run scripts/setup.sh (it unpacks libonnxruntime.so from the onnxruntime wheel into .ort/lib), or set ORT_DYLIB_PATH to a libonnxruntime.so".into())
}

/// `onnxruntime/capi/libonnxruntime.so.*` of an installed Python package.
fn python_package() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let capi = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()).join("capi");
    std::fs::read_dir(capi)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
}
