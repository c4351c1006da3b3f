//! What a plugin module may contain, checked before it is compiled.
//!
//! Compiling costs time and memory in proportion to what a module holds,
//! and a module's own limits only bind it once it runs. A 7.9 MB module of
//! 990k trivial functions took 34 s and 6 GB to compile, while every other
//! plugin swap waited behind it; a module of 40 memories got 40 times the
//! per-instance memory cap. So the sections are counted first, in one
//! linear pass of the binary (no code is compiled or validated), and a
//! module past any bound is refused with a message that names the bound.
//!
//! The bounds sit far above what the SDK's plugins use (the built-ins:
//! ~60 KB, a few hundred functions, one memory, one table) and well below
//! what hurts the broker.

use wasmparser::{Parser, Payload};

/// Bounds on a module's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleLimits {
    /// Size of the file, bytes.
    pub bytes: usize,
    /// Functions defined in the module (imports not counted).
    pub functions: u32,
    /// Bytes of the code section.
    pub code_bytes: usize,
    /// Bytes of data segments' contents.
    pub data_bytes: usize,
    /// Linear memories, imported or defined. More than one would let an
    /// instance multiply its memory cap, which applies per memory.
    pub memories: u32,
    /// Tables, imported or defined.
    pub tables: u32,
    /// Elements in a table's initial size, per table.
    pub table_elements: u64,
    /// Globals defined.
    pub globals: u32,
}

impl Default for ModuleLimits {
    fn default() -> Self {
        ModuleLimits {
            bytes: 32 << 20,
            functions: 50_000,
            code_bytes: 16 << 20,
            data_bytes: 16 << 20,
            memories: 1,
            tables: 4,
            table_elements: TABLE_ELEMENTS,
            globals: 10_000,
        }
    }
}

/// Elements a plugin instance's tables may hold in all (initially and by
/// `table.grow`): the plugin host's limiter enforces the same number.
pub const TABLE_ELEMENTS: u64 = 100_000;

/// A module past one of [`ModuleLimits`]: which bound, and by how much.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("module has {found} {what}, more than the {limit} a plugin may have")]
pub struct TooBig {
    /// What was counted ("functions", "bytes of code", ...).
    pub what: &'static str,
    /// How many it has.
    pub found: u64,
    /// The bound.
    pub limit: u64,
}

/// Count what `bytes` holds against `limits`. A module that does not parse
/// passes (the compiler refuses it with its own, better message); this only
/// answers "too big?".
pub fn check(bytes: &[u8], limits: &ModuleLimits) -> Result<(), TooBig> {
    let over = |what, found: u64, limit: u64| {
        if found > limit {
            Err(TooBig { what, found, limit })
        } else {
            Ok(())
        }
    };
    over("bytes", bytes.len() as u64, limits.bytes as u64)?;
    let (mut memories, mut tables, mut table_elements) = (0u64, 0u64, 0u64);
    for payload in Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { return Ok(()) };
        match payload {
            Payload::ImportSection(s) => {
                for import in s.into_imports().flatten() {
                    match import.ty {
                        wasmparser::TypeRef::Memory(_) => memories += 1,
                        wasmparser::TypeRef::Table(t) => {
                            tables += 1;
                            table_elements += t.initial;
                        }
                        _ => {}
                    }
                }
            }
            Payload::FunctionSection(s) => {
                over("functions", s.count().into(), limits.functions.into())?
            }
            Payload::MemorySection(s) => memories += u64::from(s.count()),
            Payload::TableSection(s) => {
                for table in s.into_iter().flatten() {
                    tables += 1;
                    table_elements += table.ty.initial;
                }
            }
            Payload::GlobalSection(s) => over("globals", s.count().into(), limits.globals.into())?,
            Payload::CodeSectionStart { size, .. } => {
                over("bytes of code", size.into(), limits.code_bytes as u64)?
            }
            Payload::DataSection(s) => {
                let mut data = 0u64;
                for segment in s.into_iter().flatten() {
                    data += segment.data.len() as u64;
                }
                over("bytes of data", data, limits.data_bytes as u64)?;
            }
            _ => {}
        }
    }
    over("memories", memories, limits.memories.into())?;
    over("tables", tables, limits.tables.into())?;
    over("table elements", table_elements, limits.table_elements)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wat(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
    }

    #[test]
    fn an_ordinary_module_passes() {
        let m = wat(r#"(module (memory 1) (table 4 funcref)
            (global (mut i32) (i32.const 0))
            (func (export "f") (result i32) i32.const 1)
            (data (i32.const 0) "hello"))"#);
        assert_eq!(check(&m, &ModuleLimits::default()), Ok(()));
    }

    #[test]
    fn each_bound_is_named_when_exceeded() {
        let limits = ModuleLimits {
            functions: 2,
            data_bytes: 4,
            tables: 1,
            table_elements: 10,
            ..ModuleLimits::default()
        };
        let cases = [
            ("(module (memory 1) (memory 1))", "memories"),
            (
                r#"(module (import "env" "m" (memory 1)) (memory 1))"#,
                "memories",
            ),
            ("(module (func) (func) (func))", "functions"),
            (
                r#"(module (memory 1) (data (i32.const 0) "hello"))"#,
                "bytes of data",
            ),
            ("(module (table 1 funcref) (table 1 funcref))", "tables"),
            ("(module (table 11 funcref))", "table elements"),
        ];
        for (text, what) in cases {
            let e = check(&wat(text), &limits).unwrap_err();
            assert_eq!(e.what, what, "{text}");
        }
        let tiny = ModuleLimits {
            bytes: 8,
            ..ModuleLimits::default()
        };
        assert_eq!(
            check(&wat("(module (func))"), &tiny).unwrap_err().what,
            "bytes"
        );
    }

    #[test]
    fn garbage_is_left_to_the_compiler() {
        assert_eq!(check(b"not wasm at all", &ModuleLimits::default()), Ok(()));
    }
}
