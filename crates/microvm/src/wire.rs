//! The migration stream's binary form of a VM's state (the `STATE` frame of format
//! version 2): the vCPUs' KVM structures as their raw bytes, everything else as the
//! snapshot format's JSON. In JSON each of those bytes is a number to print and parse
//! (82 KB for 2 vCPUs); here they are copied (45 KB in all), which the paused part of
//! a migration pays for on both ends and on every relay between them.
//!
//! Layout: `[json length: u32 LE][VmSnapshot JSON, its vcpus empty][vCPU count: u32
//! LE]`, then per vCPU: its id (u8), CPUID (list), MP state, registers, special
//! registers, float state (a tag: 0 XSAVE and its bytes, 1 the legacy FPU state as
//! JSON), XCRs, debug registers (each optional), LAPIC, MSRs (list), events
//! (optional). A structure is `[length: u32 LE][bytes]` (KVM's own layout, as the
//! `kvm-bindings` serde forms carry it: a shorter one is zero-padded, a longer one cut),
//! an optional one has a 0/1 byte first, a list a u32 count first.

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde::ser::{self, Impossible, Serialize, Serializer};

use crate::snapshot::VmSnapshot;
use crate::vstate::vcpu_state::{FloatState, FpuState, VcpuState};

/// Most entries of a list (CPUID, MSRs) accepted.
const MAX_LIST: u32 = 4096;

/// A state that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WireError(String);

fn bad(what: impl Into<String>) -> WireError {
    WireError(what.into())
}

/// Encodes `state` (its vCPUs in binary, the rest as JSON).
pub fn encode(state: &VmSnapshot) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(32 << 10);
    // The JSON part: everything but the vCPUs (serialized without them, no copy).
    let json = serde_json::to_vec(&WithoutVcpus(state))
        .map_err(|e| bad(format!("cannot encode the state: {e}")))?;
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&(state.vcpus.len() as u32).to_le_bytes());
    for v in &state.vcpus {
        vcpu(&mut out, v)?;
    }
    Ok(out)
}

/// Decodes what [`encode`] made.
pub fn decode(bytes: &[u8]) -> Result<VmSnapshot, WireError> {
    let mut r = Cursor { b: bytes };
    let n = r.u32()? as usize;
    let json = r.take(n)?;
    let mut state: VmSnapshot =
        serde_json::from_slice(json).map_err(|e| bad(format!("the state's JSON: {e}")))?;
    if !state.vcpus.is_empty() {
        return Err(bad("vCPUs in the state's JSON part"));
    }
    let count = r.u32()?;
    if count > 255 {
        return Err(bad(format!("{count} vCPUs")));
    }
    for _ in 0..count {
        state.vcpus.push(read_vcpu(&mut r)?);
    }
    if !r.b.is_empty() {
        return Err(bad(format!("{} bytes after the vCPUs", r.b.len())));
    }
    Ok(state)
}

/// `state` serialized as JSON with an empty `vcpus` list.
struct WithoutVcpus<'a>(&'a VmSnapshot);

impl Serialize for WithoutVcpus<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let v = self.0;
        let none: [u8; 0] = [];
        let mut st = s.serialize_struct("VmSnapshot", 7)?;
        st.serialize_field("config", &v.config)?;
        st.serialize_field("memory", &v.memory)?;
        st.serialize_field("vm", &v.vm)?;
        st.serialize_field("vcpus", &none)?;
        st.serialize_field("serial", &v.serial)?;
        st.serialize_field("devices", &v.devices)?;
        match &v.diff {
            Some(d) => st.serialize_field("diff", d)?,
            None => st.skip_field("diff")?,
        }
        st.end()
    }
}

fn vcpu(out: &mut Vec<u8>, v: &VcpuState) -> Result<(), WireError> {
    out.push(v.id);
    list(out, &v.cpuid)?;
    blob(out, &v.mp_state)?;
    blob(out, &v.regs)?;
    blob(out, &v.sregs)?;
    match &v.float {
        FloatState::Xsave(x) => {
            out.push(0);
            blob(out, &**x)?;
        }
        FloatState::Fpu(f) => {
            out.push(1);
            let j = serde_json::to_vec(f).map_err(|e| bad(format!("FPU state: {e}")))?;
            out.extend_from_slice(&(j.len() as u32).to_le_bytes());
            out.extend_from_slice(&j);
        }
    }
    optional(out, v.xcrs.as_ref())?;
    optional(out, v.debug_regs.as_ref())?;
    blob(out, &v.lapic)?;
    list(out, &v.msrs)?;
    optional(out, v.events.as_ref())?;
    Ok(())
}

fn read_vcpu(r: &mut Cursor<'_>) -> Result<VcpuState, WireError> {
    let id = r.u8()?;
    let cpuid = r.list()?;
    let mp_state = r.blob()?;
    let regs = r.blob()?;
    let sregs = r.blob()?;
    let float = match r.u8()? {
        0 => FloatState::Xsave(Box::new(r.blob()?)),
        1 => {
            let n = r.u32()? as usize;
            let f: FpuState = serde_json::from_slice(r.take(n)?)
                .map_err(|e| bad(format!("vCPU {id}'s FPU state: {e}")))?;
            FloatState::Fpu(f)
        }
        t => return Err(bad(format!("vCPU {id}: float state of kind {t}"))),
    };
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        float,
        xcrs: r.optional()?,
        debug_regs: r.optional()?,
        lapic: r.blob()?,
        msrs: r.list()?,
        events: r.optional()?,
    })
}

/// A KVM structure's bytes, length first.
fn blob<T: Serialize>(out: &mut Vec<u8>, v: &T) -> Result<(), WireError> {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    v.serialize(RawBytes(out))?;
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

fn optional<T: Serialize>(out: &mut Vec<u8>, v: Option<&T>) -> Result<(), WireError> {
    match v {
        Some(v) => {
            out.push(1);
            blob(out, v)
        }
        None => {
            out.push(0);
            Ok(())
        }
    }
}

fn list<T: Serialize>(out: &mut Vec<u8>, v: &[T]) -> Result<(), WireError> {
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    v.iter().try_for_each(|e| blob(out, e))
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.b.len() {
            return Err(bad("the state ends early"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn blob<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T, WireError> {
        let n = self.u32()? as usize;
        T::deserialize(FromBytes(self.take(n)?))
    }

    fn optional<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.blob().map(Some),
            t => Err(bad(format!("an optional structure marked {t}"))),
        }
    }

    fn list<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Vec<T>, WireError> {
        let n = self.u32()?;
        if n > MAX_LIST {
            return Err(bad(format!("a list of {n} structures")));
        }
        (0..n).map(|_| self.blob()).collect()
    }
}

impl ser::Error for WireError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        bad(msg.to_string())
    }
}

impl de::Error for WireError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        bad(msg.to_string())
    }
}

/// Takes the bytes of a type that serializes as bytes (the `kvm-bindings` structures)
/// and nothing else.
struct RawBytes<'a>(&'a mut Vec<u8>);

macro_rules! not_bytes {
    ($($f:ident($($t:ty),*)),*) => {
        $(fn $f(self, $(_: $t),*) -> Result<(), WireError> {
            Err(bad("a KVM structure that is not bytes"))
        })*
    };
}

impl Serializer for RawBytes<'_> {
    type Ok = ();
    type Error = WireError;
    type SerializeSeq = Impossible<(), WireError>;
    type SerializeTuple = Impossible<(), WireError>;
    type SerializeTupleStruct = Impossible<(), WireError>;
    type SerializeTupleVariant = Impossible<(), WireError>;
    type SerializeMap = Impossible<(), WireError>;
    type SerializeStruct = Impossible<(), WireError>;
    type SerializeStructVariant = Impossible<(), WireError>;

    fn serialize_bytes(self, v: &[u8]) -> Result<(), WireError> {
        self.0.extend_from_slice(v);
        Ok(())
    }

    not_bytes!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_none(),
        serialize_unit(),
        serialize_unit_struct(&'static str),
        serialize_unit_variant(&'static str, u32, &'static str)
    );

    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<(), WireError> {
        Err(bad("a KVM structure that is not bytes"))
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<(), WireError> {
        Err(bad("a KVM structure that is not bytes"))
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), WireError> {
        Err(bad("a KVM structure that is not bytes"))
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, WireError> {
        Err(bad("a KVM structure that is not bytes"))
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, WireError> {
        Err(bad("a KVM structure that is not bytes"))
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, WireError> {
        Err(bad("a KVM structure that is not bytes"))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, WireError> {
        Err(bad("a KVM structure that is not bytes"))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, WireError> {
        Err(bad("a KVM structure that is not bytes"))
    }
    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, WireError> {
        Err(bad("a KVM structure that is not bytes"))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, WireError> {
        Err(bad("a KVM structure that is not bytes"))
    }
}

/// Gives a type that deserializes from bytes (the `kvm-bindings` structures) these.
struct FromBytes<'a>(&'a [u8]);

impl<'de> Deserializer<'de> for FromBytes<'_> {
    type Error = WireError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, WireError> {
        v.visit_bytes(self.0)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_cpuid_entry2, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_xsave};

    #[test]
    fn kvm_structures_go_as_their_bytes_and_come_back() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246,
            ..Default::default()
        };
        let mut out = Vec::new();
        blob(&mut out, &regs).unwrap();
        assert_eq!(out.len(), 4 + std::mem::size_of::<kvm_regs>());
        let mut r = Cursor { b: &out };
        let back: kvm_regs = r.blob().unwrap();
        assert_eq!(back, regs);
        assert!(r.b.is_empty());
        // A shorter structure (an older layout) is zero-padded.
        let mut short = Vec::new();
        short.extend_from_slice(&8u32.to_le_bytes());
        short.extend_from_slice(&7u64.to_le_bytes());
        let back: kvm_regs = Cursor { b: &short }.blob().unwrap();
        assert_eq!((back.rax, back.rip), (7, 0));
        // Lists and options.
        let msrs = vec![
            kvm_msr_entry {
                index: 0x10,
                data: 42,
                ..Default::default()
            };
            3
        ];
        let cpuid = vec![kvm_cpuid_entry2 {
            function: 7,
            ebx: 0xdead_beef,
            ..Default::default()
        }];
        let mut x = kvm_xsave::default();
        x.region[3] = 9;
        let lapic = kvm_lapic_state::default();
        let mut out = Vec::new();
        list(&mut out, &msrs).unwrap();
        list(&mut out, &cpuid).unwrap();
        optional(&mut out, Some(&x)).unwrap();
        optional::<kvm_lapic_state>(&mut out, None).unwrap();
        blob(&mut out, &lapic).unwrap();
        let mut r = Cursor { b: &out };
        assert_eq!(r.list::<kvm_msr_entry>().unwrap(), msrs);
        assert_eq!(r.list::<kvm_cpuid_entry2>().unwrap(), cpuid);
        assert_eq!(r.optional::<kvm_xsave>().unwrap().unwrap().region[3], 9);
        assert!(r.optional::<kvm_lapic_state>().unwrap().is_none());
        let _: kvm_lapic_state = r.blob().unwrap();
        assert!(r.b.is_empty());
    }

    #[test]
    fn cut_or_misshapen_states_are_refused() {
        let mut out = Vec::new();
        list(&mut out, &[kvm_msr_entry::default(); 2]).unwrap();
        for n in 0..out.len() {
            assert!(Cursor { b: &out[..n] }.list::<kvm_msr_entry>().is_err());
        }
        let huge = (MAX_LIST + 1).to_le_bytes();
        assert!(Cursor { b: &huge }.list::<kvm_msr_entry>().is_err());
        assert!(Cursor { b: &[7] }.optional::<kvm_regs>().is_err());
        assert!(decode(&[]).is_err());
        assert!(decode(&[2, 0, 0, 0, b'{', b'}']).is_err());
    }
}
