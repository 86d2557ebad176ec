//! Tiny hand-assembled guests for tests on the machine's own /dev/kvm.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the tiny "kernel" is loaded and entered.
pub const LOAD_ADDR: u64 = 0x100_0000;

/// 64-bit code: prints `text` on COM1, writes the boot marker, then `ending`, then
/// halts forever.
pub fn code64(text: &[u8], ending: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c.extend_from_slice(&[0x66, 0xba, 0xf0, 0x03, 0xb0, 123, 0xee]); // marker
    c.extend_from_slice(ending);
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    c
}

/// i8042 reset: mov al, 0xfe; out 0x64, al.
pub const REBOOT: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64];
/// ACPI S5 through PM1a_CNT: mov dx, 0x604; mov ax, (5 << 10) | SLP_EN; out dx, ax.
pub const POWEROFF: &[u8] = &[0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef];
/// ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault.
pub const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];
/// Jump to the BIOS reset vector: mov eax, 0xffff0; jmp rax.
pub const BIOS_RESET: &[u8] = &[0xb8, 0xf0, 0xff, 0x0f, 0x00, 0xff, 0xe0];
/// Spin forever (jmp $), never halting.
pub const SPIN: &[u8] = &[0xeb, 0xfe];
/// Where [`COUNT`] keeps its counter.
pub const COUNTER_ADDR: u64 = 0x200_0000;
/// Count forever: `inc qword [COUNTER_ADDR]; inc rbx; jmp` (memory and rbx rise
/// together, rbx lagging by at most one).
pub const COUNT: &[u8] = &[
    0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x00, 0x02, // inc qword [0x2000000]
    0x48, 0xff, 0xc3, // inc rbx
    0xeb, 0xf3, // jmp back to the first inc
];
/// Nothing: the guest halts forever with interrupts off.
pub const HANG: &[u8] = &[];

/// An ELF64 executable with one PT_LOAD segment holding `code` at [`LOAD_ADDR`].
pub fn elf(code: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    e.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // phnum
    e.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    e.extend_from_slice(&0u16.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&0x1000u64.to_le_bytes()); // offset
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.resize(0x1000, 0);
    e.extend_from_slice(code);
    e
}

/// Writes `bytes` to a fresh file in `dir`.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap();
    p
}

/// Whether /dev/kvm can be opened here.
pub fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
