//! Bytes and typed arrays beside the JSON: the values, their JSON references, and how serde
//! carries them.
//!
//! On the wire a binary value is an attachment of its frame, referenced from the JSON by an
//! object with the reserved key `"__snakepit__"` (see `protocol.rs`):
//!
//! - `{"__snakepit__":"bytes","att":0}`
//! - `{"__snakepit__":"array","dtype":"float64","shape":[2,3],"att":1}`
//!
//! Where no attachment can travel (a [`serde_json::Value`], the CLI's JSON lines) the same
//! object carries the data inline instead: `"b64"` (standard base64, padded) in place of `"att"`.
//! Array data is always little-endian, in C (row-major) order.
//!
//! serde carries [`Bytes`] and [`Array`] both ways. Inside [`Pool::call_as`](crate::Pool::call_as)
//! they become attachments (no base64, and no copy of the data); anywhere else they serialise
//! to the inline form, and deserialise from either form.

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

use serde::de::{DeserializeOwned, Error as _};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::sys;

/// The reserved key of a binary value's JSON object.
pub(crate) const TAG: &str = "__snakepit__";

/// An immutable run of bytes that is cheap to clone (it is shared, never copied) and whose
/// data arrived, or leaves, as an attachment: a Python `bytes` result, say.
///
/// Build one from a `Vec<u8>` without copying; [`into_vec`](Bytes::into_vec) gives the `Vec`
/// back without copying when nothing else shares it.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn Owner>,
    range: Range<usize>,
}

/// What holds a [`Bytes`]' memory: a `Vec` of bytes or of an [`Element`] type.
trait Owner: Any + Send + Sync {
    fn bytes(&self) -> &[u8];
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<T: Element> Owner for Vec<T> {
    fn bytes(&self) -> &[u8] {
        sys::bytes_of(self)
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

impl Bytes {
    /// No bytes.
    pub fn new() -> Self {
        Bytes::from(Vec::new())
    }

    /// A copy of `data`.
    pub fn copy_from_slice(data: &[u8]) -> Self {
        Bytes::from(data.to_vec())
    }

    /// The bytes of `data`, without copying: for an [`Element`] type, their little-endian form
    /// (on a little-endian machine; a big-endian one is not supported).
    fn of_vec<T: Element>(data: Vec<T>) -> Self {
        let len = data.len() * std::mem::size_of::<T>();
        Bytes { owner: Arc::new(data), range: 0..len }
    }

    /// The number of bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.owner.bytes()[self.range.clone()]
    }

    /// The bytes `range` of these, sharing their memory.
    ///
    /// # Panics
    /// If `range` is not within `0..len()`.
    pub fn slice(&self, range: Range<usize>) -> Bytes {
        assert!(
            range.start <= range.end && range.end <= self.len(),
            "range {range:?} out of 0..{}",
            self.len()
        );
        let start = self.range.start + range.start;
        Bytes { owner: self.owner.clone(), range: start..start + range.len() }
    }

    /// The bytes as a `Vec`: without copying when this is their only owner and they are a
    /// whole `Vec<u8>` (as a received attachment is); else a copy.
    pub fn into_vec(self) -> Vec<u8> {
        let whole = self.range.start == 0 && self.range.end == self.owner.bytes().len();
        if whole {
            if let Ok(vec) = self.owner.clone().into_any().downcast::<Vec<u8>>() {
                drop(self);
                return Arc::try_unwrap(vec).unwrap_or_else(|shared| shared.as_ref().clone());
            }
        }
        self.as_slice().to_vec()
    }
}

impl Default for Bytes {
    fn default() -> Self {
        Bytes::new()
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(data: Vec<u8>) -> Self {
        Bytes::of_vec(data)
    }
}

impl From<&[u8]> for Bytes {
    fn from(data: &[u8]) -> Self {
        Bytes::copy_from_slice(data)
    }
}

impl From<String> for Bytes {
    fn from(text: String) -> Self {
        Bytes::from(text.into_bytes())
    }
}

impl From<Bytes> for Vec<u8> {
    fn from(bytes: Bytes) -> Self {
        bytes.into_vec()
    }
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Bytes {}

impl PartialEq<[u8]> for Bytes {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_slice() == other
    }
}

impl std::hash::Hash for Bytes {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state)
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 32;
        let head = &self.as_slice()[..self.len().min(SHOWN)];
        write!(f, "Bytes({} bytes: {head:02x?}{})", self.len(), if self.len() > SHOWN { "…" } else { "" })
    }
}

/// An array element's type, by numpy's name for it. Every type is little-endian on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// `bool`: one byte, 0 or 1.
    Bool,
    /// `int8`.
    Int8,
    /// `int16`.
    Int16,
    /// `int32`.
    Int32,
    /// `int64`.
    Int64,
    /// `uint8`.
    UInt8,
    /// `uint16`.
    UInt16,
    /// `uint32`.
    UInt32,
    /// `uint64`.
    UInt64,
    /// `float16`: IEEE half precision, as raw bits (Rust has no `f16` type yet).
    Float16,
    /// `float32`.
    Float32,
    /// `float64`.
    Float64,
    /// `complex64`: pairs of `f32` (real, imaginary).
    Complex64,
    /// `complex128`: pairs of `f64` (real, imaginary).
    Complex128,
}

impl DType {
    /// Every type, in the order above.
    pub const ALL: [DType; 14] = [
        DType::Bool,
        DType::Int8,
        DType::Int16,
        DType::Int32,
        DType::Int64,
        DType::UInt8,
        DType::UInt16,
        DType::UInt32,
        DType::UInt64,
        DType::Float16,
        DType::Float32,
        DType::Float64,
        DType::Complex64,
        DType::Complex128,
    ];

    /// numpy's name for it, as the wire carries it: `"float64"`.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::Int8 => "int8",
            DType::Int16 => "int16",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
            DType::UInt8 => "uint8",
            DType::UInt16 => "uint16",
            DType::UInt32 => "uint32",
            DType::UInt64 => "uint64",
            DType::Float16 => "float16",
            DType::Float32 => "float32",
            DType::Float64 => "float64",
            DType::Complex64 => "complex64",
            DType::Complex128 => "complex128",
        }
    }

    /// The type numpy calls `name`.
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The size of one element in bytes.
    pub fn itemsize(self) -> usize {
        match self {
            DType::Bool | DType::Int8 | DType::UInt8 => 1,
            DType::Int16 | DType::UInt16 | DType::Float16 => 2,
            DType::Int32 | DType::UInt32 | DType::Float32 => 4,
            DType::Int64 | DType::UInt64 | DType::Float64 | DType::Complex64 => 8,
            DType::Complex128 => 16,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed: Sized {
        /// The element whose little-endian bytes `b` are (exactly its size).
        fn from_le(b: &[u8]) -> Self;
    }
}

/// A Rust number type an [`Array`] can hold and hand out without conversion: `i8` to `i64`,
/// `u8` to `u64`, `f32` and `f64`. (Sealed: every one of them has no padding and no invalid
/// bit pattern, which is what lets their bytes be viewed in place.)
pub trait Element: sealed::Sealed + Copy + Send + Sync + 'static {
    /// Its array type.
    const DTYPE: DType;
}

macro_rules! elements {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {
            fn from_le(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("one element's bytes"))
            }
        }
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    )*};
}

elements!(i8 => Int8, i16 => Int16, i32 => Int32, i64 => Int64, u8 => UInt8, u16 => UInt16,
    u32 => UInt32, u64 => UInt64, f32 => Float32, f64 => Float64);

/// A typed n-dimensional array: an element type, a shape, and the elements' little-endian
/// bytes in C (row-major) order. In Python it is a numpy `ndarray` (or, without numpy,
/// `snakepit.Array`).
///
/// ```
/// use snakepit::{Array, DType};
/// let a = Array::from_vec(vec![1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3])?;
/// assert_eq!((a.dtype(), a.shape()), (DType::Float64, &[2, 3][..]));
/// assert_eq!(a.to_vec::<f64>()?[5], 6.0);
/// assert!(a.to_vec::<f32>().is_err(), "no silent conversion");
/// # Ok::<(), snakepit::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Array {
    dtype: DType,
    shape: Vec<usize>,
    data: Bytes,
}

impl Array {
    /// An array of `dtype` and `shape` over `data`, which must hold exactly
    /// `product(shape) * itemsize` bytes; `Error::Binary` otherwise. A shape of `[]` is a
    /// 0-d array (one element).
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>, data: impl Into<Bytes>) -> Result<Array> {
        let (shape, data) = (shape.into(), data.into());
        let want = byte_len(dtype, &shape)?;
        if data.len() != want {
            return Err(Error::Binary(format!(
                "a {dtype} array of shape {shape:?} holds {want} bytes, but {} were given",
                data.len()
            )));
        }
        if dtype == DType::Bool {
            if let Some(at) = data.iter().position(|&b| b > 1) {
                return Err(Error::Binary(format!("bool element {at} is {}, not 0 or 1", data[at])));
            }
        }
        Ok(Array { dtype, shape, data })
    }

    /// An array of `shape` that owns `data`, without copying it. Its length must be the
    /// product of `shape`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Vec<usize>>) -> Result<Array> {
        if cfg!(target_endian = "big") {
            let bytes: Vec<u8> = sys::bytes_of(&data).to_vec();
            let mut swapped = bytes;
            swapped.chunks_mut(std::mem::size_of::<T>()).for_each(<[u8]>::reverse);
            return Array::new(T::DTYPE, shape, swapped);
        }
        Array::new(T::DTYPE, shape, Bytes::of_vec(data))
    }

    /// A one-dimensional array holding a copy of `data`.
    pub fn from_slice<T: Element>(data: &[T]) -> Array {
        let n = data.len();
        Array::from_vec(data.to_vec(), [n]).expect("the shape fits the data")
    }

    /// An array of `bool`s (one byte each on the wire).
    pub fn from_bools(data: &[bool], shape: impl Into<Vec<usize>>) -> Result<Array> {
        Array::new(DType::Bool, shape, data.iter().map(|&b| b as u8).collect::<Vec<u8>>())
    }

    /// Its element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Its shape: `[]` for a 0-d array.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its elements' little-endian bytes, in C order.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }

    /// Its bytes, giving the array up.
    pub fn into_bytes(self) -> Bytes {
        self.data
    }

    /// Its elements in place, without copying: `Error::Binary` if `T` is not its element type,
    /// or its bytes are not aligned for `T` (a received array's are, in practice: each
    /// attachment is read into memory of its own) or this machine is big-endian. See
    /// [`to_vec`](Array::to_vec) for the form that always works.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check::<T>()?;
        if self.data.is_empty() {
            return Ok(&[]); // (an empty Vec's address is not aligned for anything)
        }
        if cfg!(target_endian = "big") {
            return Err(Error::Binary("arrays cannot be viewed in place on a big-endian machine".into()));
        }
        sys::cast_slice(self.data.as_slice()).ok_or_else(|| {
            Error::Binary(format!("the array's bytes are not aligned for {}: use to_vec", T::DTYPE))
        })
    }

    /// A copy of its elements: `Error::Binary` if `T` is not its element type (there is no
    /// silent conversion).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.check::<T>()?;
        if let Ok(slice) = self.as_slice::<T>() {
            return Ok(slice.to_vec());
        }
        // Unaligned, or big-endian: element by element.
        Ok(self.data.chunks_exact(std::mem::size_of::<T>()).map(T::from_le).collect())
    }

    /// Its elements as `bool`s, for a `bool` array.
    pub fn to_bools(&self) -> Result<Vec<bool>> {
        if self.dtype != DType::Bool {
            return Err(Error::Binary(format!("asked for bool elements of a {} array", self.dtype)));
        }
        Ok(self.data.iter().map(|&b| b != 0).collect())
    }

    fn check<T: Element>(&self) -> Result<()> {
        if self.dtype != T::DTYPE {
            return Err(Error::Binary(format!("asked for {} elements of a {} array", T::DTYPE, self.dtype)));
        }
        Ok(())
    }
}

/// The bytes of a `dtype` array of `shape`, or `Error::Binary` if that overflows.
fn byte_len(dtype: DType, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(dtype.itemsize(), |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::Binary(format!("an array of shape {shape:?} is too large")))
}

impl fmt::Debug for Array {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Array({}, shape {:?}, {} bytes)", self.dtype, self.shape, self.data.len())
    }
}

// --- serde -----------------------------------------------------------------------------------

thread_local! {
    /// While `Payload::from_serialize` runs: where binary values being serialised go.
    static OUTGOING: RefCell<Option<Vec<Bytes>>> = const { RefCell::new(None) };
    /// While `Payload::deserialize` runs: the attachments the references point at, and how
    /// many references were taken as binary values.
    static INCOMING: RefCell<Option<(Vec<Bytes>, usize)>> = const { RefCell::new(None) };
}

/// A thread-local context set for the length of one (de)serialisation: what it held before
/// is put back when the guard goes, even if a (de)serialiser panics, so that a context never
/// outlives its call.
struct Context<T: 'static> {
    key: &'static std::thread::LocalKey<RefCell<Option<T>>>,
    outer: Option<Option<T>>,
}

impl<T: 'static> Context<T> {
    /// Sets `key` to `value` until the guard is dropped.
    fn set(key: &'static std::thread::LocalKey<RefCell<Option<T>>>, value: T) -> Self {
        let outer = key.with(|cell| cell.borrow_mut().replace(value));
        Context { key, outer: Some(outer) }
    }

    /// Ends the context, giving back what it holds.
    fn take(mut self) -> Option<T> {
        let outer = self.outer.take().flatten();
        self.key.with(|cell| std::mem::replace(&mut *cell.borrow_mut(), outer))
    }
}

impl<T: 'static> Drop for Context<T> {
    fn drop(&mut self) {
        if let Some(outer) = self.outer.take() {
            self.key.with(|cell| *cell.borrow_mut() = outer);
        }
    }
}

/// Where `bytes` goes in the JSON: an attachment's index while a payload is being built, else
/// inline base64.
fn reference(bytes: &Bytes) -> Reference {
    OUTGOING.with(|out| match out.borrow_mut().as_mut() {
        Some(list) => {
            list.push(bytes.clone());
            Reference::Attachment(list.len() - 1)
        }
        None => Reference::Inline(base64_encode(bytes)),
    })
}

enum Reference {
    Attachment(usize),
    Inline(String),
}

fn serialize_reference<M: SerializeMap>(map: &mut M, data: &Bytes) -> std::result::Result<(), M::Error> {
    match reference(data) {
        Reference::Attachment(i) => map.serialize_entry("att", &i),
        Reference::Inline(text) => map.serialize_entry("b64", &text),
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry(TAG, "bytes")?;
        serialize_reference(&mut map, self)?;
        map.end()
    }
}

impl Serialize for Array {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry(TAG, "array")?;
        map.serialize_entry("dtype", self.dtype.name())?;
        map.serialize_entry("shape", &self.shape)?;
        serialize_reference(&mut map, &self.data)?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Binary::from_value(&Value::deserialize(d)?, None).map_err(D::Error::custom)? {
            Binary::Bytes(b) => Ok(b),
            Binary::Array(_) => Err(D::Error::custom("expected bytes, found an array")),
        }
    }
}

impl<'de> Deserialize<'de> for Array {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Binary::from_value(&Value::deserialize(d)?, None).map_err(D::Error::custom)? {
            Binary::Array(a) => Ok(a),
            Binary::Bytes(_) => Err(D::Error::custom("expected an array, found bytes")),
        }
    }
}

/// A binary value read from its JSON object.
enum Binary {
    Bytes(Bytes),
    Array(Array),
}

impl Binary {
    /// The value `v` stands for: its attachment from `attachments` (or, when `None`, from the
    /// payload being deserialised on this thread), or its inline data.
    fn from_value(v: &Value, attachments: Option<&[Bytes]>) -> std::result::Result<Binary, String> {
        let Some(obj) = v.as_object() else {
            return Err(format!(
                "expected a binary value (an object with the key \"{TAG}\"), found {}",
                crate::protocol::json_kind(v)
            ));
        };
        let kind = match obj.get(TAG) {
            Some(Value::String(kind)) => kind.as_str(),
            Some(other) => {
                return Err(format!("\"{TAG}\" is {}, not a string", crate::protocol::json_kind(other)))
            }
            None => {
                return Err(format!("expected a binary value, found an object without the key \"{TAG}\""))
            }
        };
        let data = match (obj.get("att"), obj.get("b64")) {
            (Some(att), None) => {
                let i = att.as_u64().ok_or("\"att\" is not an attachment index")? as usize;
                let found = match attachments {
                    Some(list) => list.get(i).cloned().ok_or(list.len()),
                    None => INCOMING.with(|inc| match inc.borrow_mut().as_mut() {
                        Some((list, taken)) => {
                            *taken += 1;
                            list.get(i).cloned().ok_or(list.len())
                        }
                        None => Err(0),
                    }),
                };
                found.map_err(|n| format!("attachment {i} is referenced, but the frame has {n}"))?
            }
            (None, Some(Value::String(text))) => Bytes::from(base64_decode(text)?),
            (None, Some(_)) => return Err("\"b64\" is not a string".into()),
            (Some(_), Some(_)) => return Err("a binary value has both \"att\" and \"b64\"".into()),
            (None, None) => return Err("a binary value has neither \"att\" nor \"b64\"".into()),
        };
        match kind {
            "bytes" => Ok(Binary::Bytes(data)),
            "array" => {
                let dtype = match obj.get("dtype") {
                    Some(Value::String(name)) => {
                        DType::from_name(name).ok_or_else(|| format!("unknown array dtype {name:?}"))?
                    }
                    _ => return Err("an array has no \"dtype\" string".into()),
                };
                let shape = match obj.get("shape") {
                    Some(Value::Array(dims)) => dims
                        .iter()
                        .map(|d| d.as_u64().map(|d| d as usize))
                        .collect::<Option<Vec<usize>>>()
                        .ok_or("an array's \"shape\" holds something other than non-negative integers")?,
                    _ => return Err("an array has no \"shape\" list".into()),
                };
                Array::new(dtype, shape, data).map(Binary::Array).map_err(|e| match e {
                    Error::Binary(m) => m,
                    other => other.to_string(),
                })
            }
            other => Err(format!("unknown binary kind {other:?} (expected \"bytes\" or \"array\")")),
        }
    }
}

/// A value with the attachments its references point at: what a call sends, or a reply,
/// chunk or return value brings back.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Payload {
    pub(crate) value: Value,
    pub(crate) attachments: Vec<Bytes>,
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Payload { value, attachments: Vec::new() }
    }
}

impl Payload {
    /// `args` as JSON, with the [`Bytes`] and [`Array`]s in it as attachments.
    pub(crate) fn from_serialize<A: Serialize + ?Sized>(args: &A) -> Result<Payload> {
        let context = Context::set(&OUTGOING, Vec::new());
        let value = serde_json::to_value(args);
        let attachments = context.take().unwrap_or_default();
        Ok(Payload { value: value?, attachments })
    }

    /// Deserialises the value into `R`, its references resolved against the attachments.
    ///
    /// A reference that `R` takes as plain JSON (a `serde_json::Value` field, say) would point
    /// at nothing afterwards: then the value is deserialised again from the inline form, as
    /// [`Pool::call`](crate::Pool::call) returns it.
    pub(crate) fn deserialize<R: DeserializeOwned>(self) -> Result<R> {
        if self.attachments.is_empty() {
            return Ok(serde_json::from_value(self.value)?);
        }
        let references = count_references(&self.value);
        let again = self.value.clone(); // small: the data is in the attachments
        let context = Context::set(&INCOMING, (self.attachments, 0));
        let result = serde_json::from_value(self.value);
        let (attachments, taken) = context.take().expect("set above");
        if taken == references {
            return Ok(result?);
        }
        Ok(serde_json::from_value(Payload { value: again, attachments }.into_value())?)
    }

    /// The value alone, each reference to an attachment replaced by the inline form.
    pub(crate) fn into_value(self) -> Value {
        let Payload { mut value, attachments } = self;
        if !attachments.is_empty() {
            inline(&mut value, &attachments);
        }
        value
    }

    /// Checks every reference in the value against the attachments (run on a received frame
    /// that has some, so a bad one fails there, with what is wrong).
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        /// The problem, and the place's steps from the problem outwards (built only on the
        /// way out of an error: a reply with many arrays costs no string per item).
        fn walk(v: &Value, attachments: &[Bytes]) -> std::result::Result<(), (String, Vec<String>)> {
            let inside = |v: &Value, step: &dyn Fn() -> String| {
                walk(v, attachments).map_err(|(e, mut steps)| {
                    steps.push(step());
                    (e, steps)
                })
            };
            match v {
                Value::Object(obj) if obj.contains_key(TAG) => {
                    Binary::from_value(v, Some(attachments)).map(drop).map_err(|e| (e, Vec::new()))
                }
                Value::Object(obj) => obj.iter().try_for_each(|(k, v)| inside(v, &|| format!("[{k:?}]"))),
                Value::Array(items) => {
                    items.iter().enumerate().try_for_each(|(i, v)| inside(v, &|| format!("[{i}]")))
                }
                _ => Ok(()),
            }
        }
        walk(&self.value, &self.attachments).map_err(|(e, steps)| {
            let place: String = steps.iter().rev().map(String::as_str).collect();
            format!("at value{place}: {e}")
        })
    }
}

/// The attachment references in `v`.
fn count_references(v: &Value) -> usize {
    match v {
        Value::Object(obj) if obj.contains_key(TAG) => usize::from(obj.contains_key("att")),
        Value::Object(obj) => obj.values().map(count_references).sum(),
        Value::Array(items) => items.iter().map(count_references).sum(),
        _ => 0,
    }
}

/// Replaces each attachment reference in `v` by its inline form.
fn inline(v: &mut Value, attachments: &[Bytes]) {
    match v {
        Value::Object(obj) if obj.contains_key(TAG) => {
            if let Some(att) = obj.get("att").and_then(Value::as_u64) {
                if let Some(data) = attachments.get(att as usize) {
                    let mut inlined = Map::with_capacity(obj.len());
                    for (k, item) in std::mem::take(obj) {
                        if k == "att" {
                            inlined.insert("b64".into(), Value::String(base64_encode(data)));
                        } else {
                            inlined.insert(k, item);
                        }
                    }
                    *obj = inlined;
                }
            }
        }
        Value::Object(obj) => obj.values_mut().for_each(|v| inline(v, attachments)),
        Value::Array(items) => items.iter_mut().for_each(|v| inline(v, attachments)),
        _ => {}
    }
}

// --- base64 (standard alphabet, padded) --------------------------------------------------------

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// `data` in standard base64, with padding.
pub(crate) fn base64_encode(data: &[u8]) -> String {
    let mut out = Vec::with_capacity((data.len() + 2) / 3 * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= chunk.len() { ALPHABET[(n >> shift) as usize & 63] } else { b'=' });
        }
    }
    String::from_utf8(out).expect("base64 is ASCII")
}

/// The bytes of standard, padded base64 `text` (whitespace is not allowed).
pub(crate) fn base64_decode(text: &str) -> std::result::Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return Err(format!("base64 text of {} characters is not a multiple of 4", bytes.len()));
    }
    let value = |c: u8, at: usize| -> std::result::Result<u32, String> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("invalid base64 character {:?} at {at}", c as char)),
        } as u32)
    };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (q, quad) in bytes.chunks(4).enumerate() {
        let last = (q + 1) * 4 == bytes.len();
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err(format!("misplaced base64 padding at {}", q * 4));
        }
        let mut n = 0u32;
        for (i, &c) in quad[..4 - pad].iter().enumerate() {
            n |= value(c, q * 4 + i)? << (18 - 6 * i);
        }
        // The bits past the last whole byte must be zero: one spelling for each byte string.
        if n & ((1u32 << (8 * pad)) - 1) != 0 {
            return Err(format!("base64 text at {} has stray bits before its padding", q * 4));
        }
        let got = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&got[..3 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_matches_the_standard_vectors_and_refuses_bad_text() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), coded);
            assert_eq!(base64_decode(coded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9v!A==", "Zm 9", "Zh==", "Zm9=", "é==="] {
            assert!(base64_decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arrays_check_their_shape_against_their_bytes() {
        assert!(Array::new(DType::Float64, [2, 3], vec![0u8; 48]).is_ok());
        let err = Array::new(DType::Float64, [2, 3], vec![0u8; 47]).unwrap_err();
        assert!(err.to_string().contains("holds 48 bytes, but 47"), "{err}");
        assert!(Array::from_vec(vec![1i32, 2, 3], [2, 2]).is_err());
        assert!(Array::new(DType::Int8, [usize::MAX, 2], Vec::new()).is_err(), "overflow");
        assert!(Array::new(DType::Bool, [2], vec![1u8, 2]).is_err(), "a bool is 0 or 1");
        let scalar = Array::from_vec(vec![7u16], Vec::<usize>::new()).unwrap();
        assert_eq!((scalar.ndim(), scalar.len()), (0, 1));
        let empty = Array::from_vec(Vec::<f32>::new(), [0, 5]).unwrap();
        assert!(empty.is_empty() && empty.bytes().is_empty());
    }

    #[test]
    fn elements_are_little_endian_and_typed() {
        let a = Array::from_vec(vec![1.0f64, -2.5], [2]).unwrap();
        assert_eq!(&a.bytes()[..8], &[0, 0, 0, 0, 0, 0, 0xf0, 0x3f], "1.0 in little-endian");
        assert_eq!(a.as_slice::<f64>().unwrap(), &[1.0, -2.5]);
        assert!(a.as_slice::<i64>().unwrap_err().to_string().contains("int64 elements of a float64"));
        // Unaligned bytes still convert.
        let raw = Bytes::from(vec![0u8, 1, 0, 0, 0, 2, 0, 0, 0]).slice(1..9);
        let b = Array::new(DType::Int32, [2], raw).unwrap();
        assert_eq!(b.to_vec::<i32>().unwrap(), vec![1, 2]);
        let bools = Array::from_bools(&[true, false], [2]).unwrap();
        assert_eq!(bools.to_bools().unwrap(), vec![true, false]);
    }

    #[test]
    fn bytes_give_their_vec_back_without_copying_when_alone() {
        let data = vec![1u8, 2, 3];
        let at = data.as_ptr();
        let b = Bytes::from(data);
        let shared = b.clone();
        assert_eq!(shared.clone().into_vec(), vec![1, 2, 3], "shared: a copy");
        drop(shared);
        let back = b.into_vec();
        assert_eq!(back.as_ptr(), at, "alone: the same memory");
        assert_eq!(Bytes::from(vec![1u8, 2, 3]).slice(1..3).into_vec(), vec![2, 3]);
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Sample {
        name: String,
        image: Bytes,
        weights: Vec<Array>,
    }

    fn sample() -> Sample {
        Sample {
            name: "x".into(),
            image: Bytes::from(vec![9u8, 8, 7]),
            weights: vec![Array::from_vec(vec![1.5f32, 2.5], [2]).unwrap(), Array::from_slice(&[3u64])],
        }
    }

    #[test]
    fn a_payload_carries_binary_values_as_attachments_and_back() {
        let p = Payload::from_serialize(&sample()).unwrap();
        assert_eq!(p.attachments.len(), 3);
        assert_eq!(p.value["image"], json!({TAG: "bytes", "att": 0}));
        assert_eq!(p.value["weights"][0], json!({TAG: "array", "dtype": "float32", "shape": [2], "att": 1}));
        p.check().unwrap();
        assert_eq!(p.clone().deserialize::<Sample>().unwrap(), sample());
        // The untyped form carries the data inline, and reads back the same.
        let inline = p.into_value();
        assert_eq!(inline["image"], json!({TAG: "bytes", "b64": "CQgH"}));
        assert_eq!(serde_json::from_value::<Sample>(inline.clone()).unwrap(), sample());
        assert_eq!(serde_json::to_value(sample()).unwrap(), inline, "outside a payload: inline");
    }

    #[test]
    fn a_panicking_serialiser_leaves_no_context_behind() {
        struct Boom;
        impl Serialize for Boom {
            fn serialize<S: Serializer>(&self, _: S) -> std::result::Result<S::Ok, S::Error> {
                panic!("boom")
            }
        }
        let caught = std::panic::catch_unwind(|| Payload::from_serialize(&(Bytes::from(vec![1u8]), Boom)));
        assert!(caught.is_err());
        // Outside a payload again: inline, not a reference to an attachment nobody holds.
        assert_eq!(
            serde_json::to_value(Bytes::from(vec![0u8])).unwrap(),
            json!({TAG: "bytes", "b64": "AA=="})
        );
        OUTGOING.with(|out| assert!(out.borrow().is_none()));
    }

    #[test]
    fn references_taken_as_plain_json_come_inline_instead_of_dangling() {
        #[derive(Deserialize, Debug)]
        struct Mixed {
            kept: Array,
            loose: Value,
        }
        let a = Array::from_slice(&[1u8, 2]);
        let p = Payload::from_serialize(&json!({"kept": a.clone(), "loose": [a.clone()]})).unwrap();
        assert!(p.attachments.is_empty(), "json! made the inline form already");
        let p = Payload::from_serialize(&(a.clone(), a.clone())).unwrap();
        let p = Payload { value: json!({"kept": p.value[0].clone(), "loose": [p.value[1].clone()]}), ..p };
        let mixed: Mixed = p.clone().deserialize().unwrap();
        assert_eq!(mixed.kept, a);
        assert_eq!(mixed.loose, json!([{TAG: "array", "dtype": "uint8", "shape": [2], "b64": "AQI="}]));
        let whole: Value = p.deserialize().unwrap();
        assert_eq!(whole["kept"]["b64"], "AQI=");
        INCOMING.with(|inc| assert!(inc.borrow().is_none()));
    }

    #[test]
    fn an_empty_array_views_as_an_empty_slice() {
        let empty = Array::new(DType::Float64, [0, 3], Vec::new()).unwrap();
        assert_eq!(empty.as_slice::<f64>().unwrap(), &[] as &[f64]);
        assert!(empty.as_slice::<f32>().is_err(), "still typed");
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        let bytes = Bytes::from(vec![1u8]);
        for (v, needle) in [
            (json!({TAG: "bytes", "att": 3}), "attachment 3 is referenced, but the frame has 1"),
            (json!({TAG: "bytes"}), "neither"),
            (json!({TAG: "bytes", "att": 0, "b64": ""}), "both"),
            (json!({TAG: "blob", "att": 0}), "unknown binary kind"),
            (json!({TAG: 5, "att": 0}), "not a string"),
            (json!({TAG: "array", "dtype": "float64", "shape": [1], "att": 0}), "holds 8 bytes, but 1"),
            (json!({TAG: "array", "dtype": "object", "shape": [1], "att": 0}), "unknown array dtype"),
            (json!({TAG: "array", "dtype": "uint8", "shape": [-1], "att": 0}), "non-negative"),
            (json!({TAG: "bytes", "b64": "!!!!"}), "invalid base64"),
        ] {
            let p = Payload { value: json!({"k": [v]}), attachments: vec![bytes.clone()] };
            let err = p.check().unwrap_err();
            assert!(err.contains(needle), "{err}");
            assert!(err.starts_with(r#"at value["k"][0]: "#), "the place is named: {err}");
        }
        assert!(serde_json::from_value::<Bytes>(json!("text"))
            .unwrap_err()
            .to_string()
            .contains("found a string"));
        let stray = serde_json::from_value::<Bytes>(json!({TAG: "bytes", "att": 0})).unwrap_err();
        assert!(stray.to_string().contains("the frame has 0"), "{stray}");
        assert!(serde_json::from_value::<Array>(json!({TAG: "bytes", "b64": ""})).is_err());
    }
}
