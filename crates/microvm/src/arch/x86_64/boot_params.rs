//! Loading a Linux kernel (ELF vmlinux or bzImage), its initramfs and command line, and
//! writing the zero page (boot_params with the e820 map) for the 64-bit boot protocol.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{self, Elf};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_START, HIGH_MEM_START, ZERO_PAGE_ADDR};
use crate::vstate::memory::GuestMemory;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PAGE: u64 = 4096;

/// Errors while loading the kernel, initramfs or command line.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file is neither a loadable ELF nor a bzImage.
    #[error("kernel is neither an x86_64 ELF vmlinux ({elf}) nor a bzImage ({bz})")]
    BadKernel {
        /// Why the ELF loader refused it.
        elf: linux_loader::loader::Error,
        /// Why the bzImage loader refused it.
        bz: linux_loader::loader::Error,
    },
    /// The kernel loaded, but its entry point lies outside guest memory.
    #[error("kernel entry point {0:#x} is outside guest memory")]
    BadEntry(u64),
    /// The command line is too long or has invalid characters.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// The command line could not be written.
    #[error("cannot write the kernel command line: {0}")]
    CmdlineLoad(linux_loader::loader::Error),
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error("initramfs of {size} bytes does not fit in guest memory ({room} bytes free above the kernel)")]
    InitrdTooBig {
        /// Size of the initramfs.
        size: u64,
        /// Room available.
        room: u64,
    },
    /// Reading the initramfs into guest memory failed.
    #[error("cannot read the initramfs: {0}")]
    InitrdRead(String),
    /// Writing the zero page failed.
    #[error("cannot write boot_params: {0}")]
    ZeroPage(vm_memory::GuestMemoryError),
}

/// Where and how the kernel was loaded.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage's setup header (None for an ELF vmlinux).
    pub setup_header: Option<setup_header>,
}

/// Loads an ELF vmlinux (preferred: no decompression) or a bzImage into guest memory.
pub fn load_kernel(mem: &GuestMemory, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let high = Some(GuestAddress(HIGH_MEM_START));
    let loaded = match Elf::load(mem, None, kernel, high) {
        Ok(r) => LoadedKernel {
            entry: r.kernel_load.raw_value(),
            end: r.kernel_end,
            setup_header: None,
        },
        Err(linux_loader::loader::Error::Elf(elf::Error::InvalidElfMagicNumber)) => {
            match BzImage::load(mem, None, kernel, high) {
                Ok(r) => LoadedKernel {
                    // The 64-bit entry of a bzImage is 0x200 past its protected-mode start.
                    entry: r.kernel_load.raw_value() + 0x200,
                    end: r.kernel_end,
                    setup_header: r.setup_header,
                },
                Err(bz) => {
                    return Err(BootError::BadKernel {
                        elf: linux_loader::loader::Error::Elf(elf::Error::InvalidElfMagicNumber),
                        bz,
                    })
                }
            }
        }
        Err(e) => {
            return Err(BootError::BadKernel {
                elf: e,
                bz: linux_loader::loader::Error::Bzimage(
                    linux_loader::loader::bzimage::Error::InvalidBzImage,
                ),
            })
        }
    };
    if !mem.address_in_range(GuestAddress(loaded.entry)) {
        return Err(BootError::BadEntry(loaded.entry));
    }
    Ok(loaded)
}

/// Builds a kernel command line.
pub fn build_cmdline(cmdline: &str) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !cmdline.trim().is_empty() {
        c.insert_str(cmdline.trim()).map_err(BootError::Cmdline)?;
    }
    Ok(c)
}

/// Writes the command line at its fixed address; returns its length without the NUL.
pub fn write_cmdline(mem: &GuestMemory, cmdline: &Cmdline) -> Result<usize, BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline).map_err(BootError::CmdlineLoad)?;
    Ok(cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len())
}

/// Copies the initramfs `file` of `size` bytes to the highest page-aligned address of
/// the first RAM region that lies above `kernel_end`; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemory,
    kernel_end: u64,
    file: &mut File,
    size: u64,
) -> Result<(u64, u64), BootError> {
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().0 + r.len())
        .unwrap_or(0);
    let floor = kernel_end.max(HIGH_MEM_START).div_ceil(PAGE) * PAGE;
    let room = low_end.saturating_sub(floor);
    if size > room {
        return Err(BootError::InitrdTooBig { size, room });
    }
    let addr = (low_end - size) & !(PAGE - 1);
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig { size, room })?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| BootError::InitrdRead(e.to_string()))?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(|e| BootError::InitrdRead(e.to_string()))?;
    Ok((addr, size))
}

/// The e820 map for guest RAM ranges: base memory below the EBDA, the EBDA..1 MiB hole
/// reserved, high memory, and any RAM above the MMIO gap.
pub fn e820_map(ram: &[(u64, u64)]) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIGH_MEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for &(start, size) in ram {
        let end = start + size;
        let start = start.max(HIGH_MEM_START);
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// What goes into the zero page besides the e820 map.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroPage {
    /// Length of the command line (without NUL).
    pub cmdline_len: usize,
    /// Initramfs (address, size), if any.
    pub initrd: Option<(u64, u64)>,
    /// The bzImage setup header, if booting a bzImage.
    pub setup_header: Option<setup_header>,
    /// Physical address of the ACPI RSDP, if tables were written.
    pub rsdp: Option<u64>,
}

/// Writes boot_params at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page(
    mem: &GuestMemory,
    ram: &[(u64, u64)],
    zp: &ZeroPage,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = zp.setup_header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = zp.cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, size)) = zp.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = zp.rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let map = e820_map(ram);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = *e;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(BootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use std::io::Write;

    #[test]
    fn e820_reserves_the_bios_hole() {
        let m = e820_map(&[(0, 128 << 20)]);
        assert_eq!(m.len(), 3);
        assert_eq!(({ m[0].addr }, { m[0].size }), (0, EBDA_START));
        assert_eq!({ m[1].r#type }, E820_RESERVED);
        assert_eq!(
            ({ m[2].addr }, { m[2].size }),
            (HIGH_MEM_START, (128 << 20) - HIGH_MEM_START)
        );
    }

    #[test]
    fn garbage_kernel_is_refused() {
        let mem = create_guest_memory(&[(0, 32 << 20)]).unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0x42; 8192]).unwrap();
        let err = load_kernel(&mem, &mut f).unwrap_err();
        assert!(matches!(err, BootError::BadKernel { .. }), "{err}");
        let mut empty = tempfile::tempfile().unwrap();
        assert!(load_kernel(&mem, &mut empty).is_err());
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_or_is_refused() {
        let mem = create_guest_memory(&[(0, 16 << 20)]).unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 10000]).unwrap();
        let (addr, size) = load_initrd(&mem, 2 << 20, &mut f, 10000).unwrap();
        assert_eq!(addr % PAGE, 0);
        assert!(addr + size <= 16 << 20);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 9999)).unwrap(), 7);
        let mut big = tempfile::tempfile().unwrap();
        big.set_len(15 << 20).unwrap();
        let err = load_initrd(&mem, 2 << 20, &mut big, 15 << 20).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }));
    }

    #[test]
    fn zero_page_has_magic_cmdline_and_initrd() {
        let mem = create_guest_memory(&[(0, 16 << 20)]).unwrap();
        let c = build_cmdline("console=ttyS0 quiet").unwrap();
        let len = write_cmdline(&mem, &c).unwrap();
        assert_eq!(len, "console=ttyS0 quiet".len());
        let zp = ZeroPage {
            cmdline_len: len,
            initrd: Some((0x80_0000, 1234)),
            ..Default::default()
        };
        write_zero_page(&mem, &[(0, 16 << 20)], &zp).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.ramdisk_image }, 0x80_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
        assert_eq!(p.e820_entries, 3);
        let mut s = [0u8; 19];
        mem.read_slice(&mut s, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&s, b"console=ttyS0 quiet");
    }
}
