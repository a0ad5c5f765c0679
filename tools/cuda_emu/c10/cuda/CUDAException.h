// Emulator shim (see ../../runtime.h): replaces the real c10 header.
#pragma once
#include "../../runtime.h"
